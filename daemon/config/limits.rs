//! The limits of numeric and duration settings, and their readers: each value is checked
//! against its range, and a problem is located at its `file:line:column`.
//!
//! The largest value of each setting (README, "Config reference") is far past any sane use, and
//! well within what the daemon can add to an `Instant`, arm a timer with,
//! allocate or hand tokio (a `Semaphore` holds at most `usize::MAX >> 3` permits). A value past
//! one is refused with its location, like any other problem: never a panic at run time.

use std::time::Duration;

use toml::Spanned;

use super::parse::{Problems, RawSize};

/// `fresh_timeout`, `write_behind.delay`, `tail.poll_interval`, `tail.lease`,
/// `http.request_timeout`, `http.header_timeout`: an hour.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);
/// `cache.ttl` and a family's `ttl`: a year (365 days).
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The shortest TTL: 1 ms (Redis keeps TTLs in whole milliseconds; 0 is not one).
pub const MIN_TTL: Duration = Duration::from_millis(1);
/// `cache.max_entries`: a billion.
pub const MAX_ENTRIES: u64 = 1_000_000_000;
/// `cache.max_bytes`: from 1 MiB (less would hold next to nothing beside the daemon's own
/// memory) to 1 TiB.
pub const MIN_MAX_BYTES: u64 = 1 << 20;
pub const MAX_BYTES: u64 = 1 << 40;
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

/// A size from `min` to `MAX_BYTES`: a whole number of bytes, or one with a unit (`B`, `KB`,
/// `MB`, `GB`, `TB` in powers of 1000; `KiB`, `MiB`, `GiB`, `TiB` in powers of 1024; any
/// case, a space allowed before it). None (a problem recorded) when it is none of these.
pub(super) fn size(
    value: &Spanned<RawSize>,
    name: &str,
    min: u64,
    problems: &mut Problems<'_>,
) -> Option<u64> {
    let bytes = match value.get_ref() {
        RawSize::Bytes(n) => u64::try_from(*n).ok(),
        RawSize::Text(text) => parse_size(text),
    };
    match bytes {
        Some(n) if (min..=MAX_BYTES).contains(&n) => Some(n),
        _ => {
            let shown = match value.get_ref() {
                RawSize::Bytes(n) => n.to_string(),
                RawSize::Text(text) => format!("{text:?}"),
            };
            problems.at(
                value.span(),
                format!(
                    "`{name}` must be a size from {min} bytes (1MiB) to 1TiB: a number of bytes or one with a unit such as \"512MiB\" or \"2GB\", not {shown}"
                ),
            );
            None
        }
    }
}

/// `"512MiB"`, `"2 GB"`, `"1048576"`: the bytes it says, if it says a whole number of them.
fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let scale: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_with_their_units() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("2 GB"), Some(2_000_000_000));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("3kib"), Some(3072));
        for wrong in [
            "",
            "MiB",
            "1.5GiB",
            "-1MiB",
            "12 parsecs",
            "99999999999999999999TiB",
        ] {
            assert_eq!(parse_size(wrong), None, "{wrong}");
        }
    }
}
