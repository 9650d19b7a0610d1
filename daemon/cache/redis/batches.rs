//! Each kind of Redis invalidation as one `Invalidation` (a batch's plan, operators' actions
//! among its changes; a pause; a reload's retirements), with the message app-local caches receive for it: the
//! fan-out message is built here and nowhere else.

use super::RETIRED;
use crate::registry::Live;
use crate::types::Plan;

/// One batch of invalidations, as Redis applies it.
#[derive(Debug, Default)]
pub struct Invalidation {
    /// The outbox position the batch ends at.
    pub position: u64,
    pub keys: Vec<String>,
    /// Groups to empty, each with the mark fills must have read at or after.
    pub groups: Vec<(String, u64)>,
    /// Values read before this position are refused (0: no change).
    pub floor: u64,
    /// The message (JSON) for app-local caches: published on the channel and appended to the
    /// stream, both in the script that applies the batch.
    pub message: String,
    /// The applying daemon's lease epoch: Redis refuses a batch from an older epoch.
    pub epoch: u64,
}

impl Invalidation {
    /// A batch's plan, which ends at outbox position `last`: its keys, its tags' groups, the
    /// groups of the families whose tables it flushed, and everything on a flush of everything.
    pub fn for_plan(plan: &Plan, live: &Live, last: u64) -> Invalidation {
        let mut groups: Vec<(String, u64)> = plan
            .tags
            .iter()
            .map(|(tag, &position)| (tag_group(tag), position))
            .collect();
        let mut families: Vec<&str> = Vec::new();
        for family in &live.families {
            let pattern = family.def.pattern.source();
            let tables = plan
                .flush_tables
                .iter()
                .filter(|(table, _)| live.depends_on(family, table))
                .map(|(_, &position)| position);
            let flushed = tables
                .chain(plan.flush_all)
                .chain(plan.flush_families.get(pattern).copied())
                .max();
            if let Some(position) = flushed {
                groups.push((family.def.group.clone(), position));
                families.push(pattern);
            }
        }
        let mut keys: Vec<String> = plan.keys.keys().cloned().collect();
        keys.sort_unstable();
        let mut tags: Vec<&str> = plan.tags.keys().map(String::as_str).collect();
        tags.sort_unstable();
        let key_names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let message = fan_out_message(last, &key_names, &tags, &families, plan.flush_all.is_some());
        Invalidation {
            epoch: 0,
            position: last,
            keys,
            groups,
            floor: plan.flush_all.unwrap_or(0),
            message,
        }
    }

    /// While capture is paused, app writes go uncaptured, so nothing in Redis can be trusted:
    /// every family's values are removed (and app-local caches told to drop everything), and
    /// fills that read before `head` are refused.
    pub fn for_pause(live: &Live, cursor: u64, head: u64) -> Invalidation {
        Invalidation {
            position: cursor,
            keys: Vec::new(),
            groups: live
                .families
                .iter()
                .map(|f| (f.def.group.clone(), head.saturating_add(1)))
                .collect(),
            floor: head.saturating_add(1),
            message: fan_out_message(cursor, &[], &[], &[], true),
            epoch: 0,
        }
    }

    /// The groups of families a reload replaced, (pattern, group): their values are removed and
    /// no fill of theirs is stored again.
    pub fn for_retirement(retired: &[(String, String)], cursor: u64) -> Invalidation {
        let families: Vec<&str> = retired
            .iter()
            .map(|(pattern, _)| pattern.as_str())
            .collect();
        Invalidation {
            position: cursor,
            keys: Vec::new(),
            groups: retired
                .iter()
                .map(|(_, group)| (group.clone(), RETIRED))
                .collect(),
            floor: 0,
            message: fan_out_message(cursor, &[], &[], &families, false),
            epoch: 0,
        }
    }
}

/// The message app-local caches receive for one invalidation, on the channel and as the stream
/// entry's `message` field (README, "Fan-out").
pub fn fan_out_message(
    position: u64,
    keys: &[&str],
    tags: &[&str],
    families: &[&str],
    all: bool,
) -> String {
    serde_json::json!({
        "position": position, "keys": keys, "tags": tags, "families": families, "all": all,
    })
    .to_string()
}

/// The group of a tag: the sorted set of the keys whose values carry it.
pub fn tag_group(tag: &str) -> String {
    format!("t:{tag}")
}
