//! Admin actions: delete a key, invalidate a tag, flush a family or everything. Each needs the
//! bearer token the config names (`admin_token`) and is disabled when none is set. Each is
//! written into the outbox, where the daemon holding the lease applies it in order, whichever
//! daemon received it (a standby's own cache is not used, so the action must reach the active
//! one's): values read before its position are dropped, values read after it (the refills) are
//! fresh.

use hyper::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::Http;
use super::keys::decode_component;
use super::reply::{self, Body};
use crate::capture;
use crate::config::Config;
use crate::tail::lease::Lease;
use crate::types::AdminAction;

/// An admin action, once the token checks out: written into the outbox, then answered once the
/// daemon that applies the outbox (this one, or the active one if this is a standby) has
/// applied it, or with `202` if that takes longer than `fresh_timeout`.
pub async fn act(http: &Http, headers: &HeaderMap, action: AdminAction) -> Response<Body> {
    let config = http.sources.registry.config();
    if let Err((status, message)) = authorize(&config, headers) {
        return refusal(status, message);
    }
    let worker = http.clone();
    let described = format!("{action:?}");
    let written = tokio::task::spawn_blocking(move || write(&worker, &action)).await;
    let position = match written {
        Ok(Ok(position)) => position,
        Ok(Err((status, message))) => return reply::error(status, message),
        Err(e) => return reply::error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let timeout = config.fresh_timeout;
    let mut applied = http.sources.progress.subscribe();
    let done = tokio::time::timeout(timeout, applied.wait_for(|&at| at >= position))
        .await
        .is_ok_and(|seen| seen.is_ok());
    if done {
        tracing::info!(action = described, position, "admin action applied");
        return reply::json(
            StatusCode::OK,
            &json!({"done": described, "position": position}),
        );
    }
    let holder = http
        .sources
        .pool
        .read(Lease::current)
        .await
        .ok()
        .flatten()
        .map_or_else(|| "none".to_owned(), |h| h.holder);
    tracing::warn!(
        action = described,
        position,
        active = holder,
        "admin action not applied in time"
    );
    reply::json(
        StatusCode::ACCEPTED,
        &json!({
            "accepted": described,
            "position": position,
            "applied": false,
            "active": holder,
            "message": format!(
                "written to the outbox at position {position}, but the daemon applying the outbox (lease holder {holder}) has not applied it within {timeout:?}: it takes effect when that daemon applies it (its /v1/status shows `cursor`)"
            ),
        }),
    )
}

/// `POST /v1/admin/invalidate?tag=TAG` and `POST /v1/admin/flush[?family=PATTERN]`.
pub fn action_of(path: &str, query: Option<&str>) -> Result<AdminAction, (StatusCode, String)> {
    let query = query.unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| decode_component(v))
    };
    match (path, param("tag"), param("family")) {
        ("/v1/admin/invalidate", Some(Ok(tag)), _) => Ok(AdminAction::Tag(tag)),
        ("/v1/admin/flush", _, Some(Ok(family))) => Ok(AdminAction::Family(family)),
        ("/v1/admin/flush", _, None) => Ok(AdminAction::All),
        (_, Some(Err(problem)), _) | (_, _, Some(Err(problem))) => Err((
            StatusCode::BAD_REQUEST,
            format!("malformed parameter: {problem}"),
        )),
        _ => Err((
            StatusCode::BAD_REQUEST,
            "POST /v1/admin/invalidate?tag=TAG, or POST /v1/admin/flush[?family=PATTERN]"
                .to_owned(),
        )),
    }
}

/// A failed token check as an answer: 403 when admin is disabled, 401 (with
/// `WWW-Authenticate`) without the right token.
pub fn refusal(status: StatusCode, message: String) -> Response<Body> {
    let mut answer = reply::error(status, message);
    if status == StatusCode::UNAUTHORIZED {
        answer.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    answer
}

/// Checks the request's `Authorization: Bearer …` against the config's token.
pub fn authorize(config: &Config, headers: &HeaderMap) -> Result<(), (StatusCode, String)> {
    let Some(token) = &config.admin_token else {
        return Err((
            StatusCode::FORBIDDEN,
            "admin actions are disabled: set `admin_token` in the config to enable them".into(),
        ));
    };
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) => Ok(()),
        Some(_) => Err((StatusCode::UNAUTHORIZED, "wrong admin token".into())),
        None => Err((
            StatusCode::UNAUTHORIZED,
            "admin actions need `Authorization: Bearer <admin_token>`".into(),
        )),
    }
}

/// Compares without returning early, so timing does not tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut differ = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        differ |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    differ == 0
}

/// Writes the action into the outbox (after checking that it names something in the config in
/// force); returns its position. Blocking.
fn write(http: &Http, action: &AdminAction) -> Result<u64, (StatusCode, String)> {
    let live = http.sources.registry.live();
    if let AdminAction::Family(pattern) = action
        && live.family_named(pattern).is_none()
    {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no key family `{pattern}` in the config in force"),
        ));
    }
    // A position of its own: values read before it are dropped, values read after it are
    // fresh (even after a change cachetail could not see, which is why operators flush). The
    // daemon holding the lease applies it in order with the changes around it.
    crate::db::open_writer(&live.config.database)
        .and_then(|conn| capture::write_admin_marker(&conn, action))
        .map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot write the admin action into the outbox: {e}"),
            )
        })
}
