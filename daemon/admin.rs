//! Admin actions: delete a key, invalidate a tag, flush a family or everything. Each needs the
//! bearer token the config names (`admin_token`) and is disabled when none is set. Each writes a
//! position marker into the outbox first: values read before it are dropped, values read after
//! it (the refills) are fresh.

use std::sync::atomic::Ordering;

use hyper::StatusCode;
use hyper::header::{AUTHORIZATION, HeaderMap};

use crate::capture;
use crate::config::Config;
use crate::redis_cache::{self, Invalidation};
use crate::state::Shared;

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Key(String),
    Tag(String),
    /// A family, by its pattern as written in the config.
    Family(String),
    All,
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
        Some(given) if constant_time_eq(given.as_bytes(), token.as_bytes()) => Ok(()),
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

/// Carries the action out; returns the outbox position it took effect at. Blocking.
pub fn perform(shared: &Shared, action: &Action) -> Result<u64, (StatusCode, String)> {
    let unavailable = |e: String| (StatusCode::SERVICE_UNAVAILABLE, e);
    let config = shared.config();
    let family = match action {
        Action::Family(pattern) => Some(
            config
                .families
                .iter()
                .find(|f| f.pattern.source() == pattern)
                .ok_or_else(|| {
                    (
                        StatusCode::NOT_FOUND,
                        format!("no key family `{pattern}` in the config in force"),
                    )
                })?,
        ),
        _ => None,
    };
    // A position of its own: values read before it are dropped, values read after it are
    // fresh (even after a change cachetail could not see, which is why operators flush).
    let head = crate::sqlite::open_writer(&config.database)
        .and_then(|conn| capture::write_marker(&conn))
        .map_err(|e| unavailable(format!("cannot write a position marker to the outbox: {e}")))?;
    match &shared.redis {
        None => match action {
            Action::Key(key) => shared.cache.invalidate(key),
            Action::Tag(tag) => shared.cache.invalidate_tag(tag, head),
            Action::Family(_) => {
                if let Some(family) = family {
                    family.floor.fetch_max(head, Ordering::AcqRel);
                }
            }
            Action::All => shared.cache.flush_all(head),
        },
        Some(redis) => {
            let mut batch = Invalidation {
                position: head,
                epoch: 0,
                ..Invalidation::default()
            };
            let (mut keys, mut tags, mut families) = (vec![], vec![], vec![]);
            match action {
                Action::Key(key) => {
                    batch.keys.push(key.clone());
                    keys.push(key.clone());
                    shared.cache.invalidate(key);
                }
                Action::Tag(tag) => {
                    batch.groups.push((redis_cache::tag_group(tag), head));
                    tags.push(tag.clone());
                }
                Action::Family(pattern) => {
                    if let Some(family) = family {
                        batch.groups.push((family.group.clone(), head));
                    }
                    families.push(pattern.clone());
                }
                Action::All => {
                    for family in &config.families {
                        batch.groups.push((family.group.clone(), head));
                    }
                    batch.floor = head;
                }
            }
            batch.message = redis_cache::fan_out_message(
                head,
                &names(&keys),
                &names(&tags),
                &names(&families),
                *action == Action::All,
            );
            redis
                .remove(&batch)
                .map_err(|e| unavailable(e.to_string()))?;
        }
    }
    tracing::info!(?action, position = head, "admin action");
    Ok(head)
}

fn names(list: &[String]) -> Vec<&str> {
    list.iter().map(String::as_str).collect()
}
