//! The limits of numeric and duration settings, and their readers: each value is checked
//! against its range, and a problem is located at its `file:line:column`.
//!
//! The largest value of each setting (README, "Config reference") is far past any sane use, and
//! well within what the daemon can add to an `Instant`, arm a timer with,
//! allocate or hand tokio (a `Semaphore` holds at most `usize::MAX >> 3` permits). A value past
//! one is refused with its location, like any other problem: never a panic at run time.

use std::time::Duration;

use toml::Spanned;

use super::parse::Problems;

/// `fresh_timeout`, `write_behind.delay`, `tail.poll_interval`, `tail.lease`,
/// `http.request_timeout`, `http.header_timeout`: an hour.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// `cache.ttl` and a family's `ttl`: a year (365 days).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The shortest TTL: 1 ms (Redis keeps TTLs in whole milliseconds; 0 is not one).
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// `cache.max_entries`: a billion.
pub const MAX_ENTRIES: u64 = 1_000_000_000;
/// `write_behind.workers`.
pub const MAX_WORKERS: u64 = 1024;
/// `tail.batch_size`.
pub const MAX_BATCH_SIZE: u64 = 1_000_000;
/// `http.max_connections`.
pub const MAX_CONNECTIONS: u64 = 1_000_000;
/// `http.max_event_streams`.
pub const MAX_EVENT_STREAMS: u64 = 100_000;
/// `http.readers`: SQLite connections, each a file descriptor and its page cache.
pub const MAX_READERS: u64 = 1024;
/// `http.read_queue`.
pub const MAX_READ_QUEUE: u64 = 1_000_000;
/// `[cache] max_connections`: Redis's own default client limit.
pub const MAX_REDIS_CONNECTIONS: u64 = 10_000;
/// `[cache] stream_max_len`: the invalidation stream's entries kept in Redis (each the size of
/// its message: ten million small ones are a few GB).
pub const MAX_STREAM_LEN: u64 = 10_000_000;

/// A duration setting, at most `max` (the default when absent or wrong).
pub(super) fn duration(
    value: Option<&Spanned<String>>,
    name: &str,
    default: Duration,
    max: Duration,
    problems: &mut Problems<'_>,
) -> Duration {
    let Some(text) = value else { return default };
    let parsed = match humantime::parse_duration(text.get_ref().trim()) {
        Ok(parsed) => parsed,
        Err(e) => {
            problems.at(
                text.span(),
                format!(
                    "`{name}` = {:?} is not a duration like \"50ms\", \"10s\" or \"10m\": {e}",
                    text.get_ref()
                ),
            );
            return default;
        }
    };
    if parsed > max {
        problems.at(
            text.span(),
            format!(
                "`{name}` = {:?} is too long: at most {}",
                text.get_ref(),
                written(max)
            ),
        );
        return default;
    }
    parsed
}

/// A whole duration as a config would write it: "365d", "1h", "90s".
fn written(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s => format!("{s}s"),
    }
}

/// A TTL: from `MIN_TTL` to `MAX_TTL`.
pub(super) fn ttl(
    value: Option<&Spanned<String>>,
    name: &str,
    default: Duration,
    problems: &mut Problems<'_>,
) -> Duration {
    let ttl = duration(value, name, default, MAX_TTL, problems);
    if ttl < MIN_TTL
        && let Some(text) = value
    {
        problems.at(
            text.span(),
            format!("`{name}` = {:?} is too short: at least 1ms", text.get_ref()),
        );
        return default;
    }
    ttl
}

/// A whole number from 1 to `max` (the default when absent or wrong).
pub(super) fn positive(
    value: Option<&Spanned<i64>>,
    name: &str,
    default: u64,
    max: u64,
    problems: &mut Problems<'_>,
) -> u64 {
    let Some(number) = value else { return default };
    match u64::try_from(*number.get_ref()) {
        Ok(n) if (1..=max).contains(&n) => n,
        _ => {
            problems.at(
                number.span(),
                format!(
                    "`{name}` must be a whole number from 1 to {max}, not {}",
                    number.get_ref()
                ),
            );
            default
        }
    }
}

/// `positive`, as a count of things the daemon holds in memory at once.
pub(super) fn count(
    value: Option<&Spanned<i64>>,
    name: &str,
    default: usize,
    max: u64,
    problems: &mut Problems<'_>,
) -> usize {
    let max = max.min(usize::MAX as u64);
    usize::try_from(positive(value, name, default as u64, max, problems)).unwrap_or(default)
}
