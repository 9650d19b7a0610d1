//! Rules: turn a batch of row changes into the cache actions it calls for.
//!
//! A key template takes its `{column}`s from the changed row: the new row on insert, the old one
//! on delete, both on update (a review moved from book 3 to book 5 touches both books). Within a
//! batch, actions on one key merge into one: the strongest strategy, the latest position.
//!
//! A derived rule's lookup (a change reaching the family's placeholder through other tables)
//! needs the database: the plan only gathers the values it asks for (`Plan::lookups`), and the
//! tail runs them before applying it (`apply::lookups`). `plan` stays a pure function.
//!
//! A row that could not be decoded names no key: its whole table is flushed (every family that
//! depends on it, see `Live::depends_on`), or everything when even its table is unknown.

use std::sync::Arc;

use rusqlite::types::Value;

use crate::config::{Config, Rule, Template};
use crate::types::{
    AdminAction, Change, ChangeBody, KeyAction, Layout, Op, Plan, Strategy, Unreadable,
};

/// Maps each change through the rules that watch its table.
pub fn plan(config: &Config, changes: &[Change]) -> Plan {
    let mut plan = Plan::default();
    // Every key and tag is rendered into this one buffer; only one not seen before in the batch
    // is copied out (a drained backlog names the same keys again and again).
    let mut rendered = String::new();
    for change in changes {
        let row = match &change.body {
            ChangeBody::Row(row) | ChangeBody::Replaced(row) => row,
            ChangeBody::Marker => continue,
            ChangeBody::Admin(action) => {
                plan_admin(&mut plan, action, change.position);
                continue;
            }
            ChangeBody::Flush { table }
            | ChangeBody::Unreadable(Unreadable {
                table: Some(table), ..
            }) => {
                let mark = plan.flush_tables.entry(Arc::clone(table)).or_insert(0);
                *mark = (*mark).max(change.position);
                continue;
            }
            ChangeBody::Unreadable(Unreadable { table: None, .. }) | ChangeBody::Reset => {
                plan.flush_all = Some(change.position);
                continue;
            }
        };
        for (index, rule) in config.rules_for_indexed(&row.layout.table) {
            plan_rule(
                &mut plan,
                (index, rule),
                row,
                change.position,
                &mut rendered,
            );
        }
    }
    plan
}

/// One rule's actions for one changed row, into `plan` (`rendered`: the shared buffer).
fn plan_rule(
    plan: &mut Plan,
    (index, rule): (usize, &Rule),
    row: &crate::types::RowChange,
    position: u64,
    rendered: &mut String,
) {
    if !rule.on.contains(&row.op) {
        return;
    }
    let images: &[Option<&Vec<Value>>] = match row.op {
        Op::Insert => &[row.new.as_ref()],
        Op::Delete => &[row.old.as_ref()],
        Op::Update => &[row.old.as_ref(), row.new.as_ref()],
    };
    let (mut named, mut recomputed) = (0, 0);
    for image in images.iter().copied() {
        let Some(image) = image else { continue };
        for template in &rule.keys {
            match render(template, &row.layout, image, rendered) {
                Rendered::Key => {
                    named += 1;
                    if rule.strategy != Strategy::Delete {
                        recomputed += 1;
                    }
                    let action = KeyAction {
                        strategy: rule.strategy,
                        position,
                    };
                    plan.name_key(rendered, action);
                }
                Rendered::Null => {}
                Rendered::Uncaptured => plan.flush_all = Some(position),
            }
        }
        for template in &rule.tags {
            match render(template, &row.layout, image, rendered) {
                Rendered::Key => {
                    named += 1;
                    match plan.tags.get_mut(rendered.as_str()) {
                        Some(mark) => *mark = (*mark).max(position),
                        None => {
                            plan.tags.insert(rendered.clone(), position);
                        }
                    }
                }
                Rendered::Null => {}
                Rendered::Uncaptured => plan.flush_all = Some(position),
            }
        }
        ask_lookups(plan, (index, rule), &row.layout, image, position);
    }
    let counts = plan.per_rule.entry(index).or_insert((0, 0));
    counts.0 += named;
    counts.1 += recomputed;
}

/// One change's actions rule by rule (each rule's own plan, with its index in the config): for
/// the live feed, which tells what reached each key. Only computed while someone watches.
pub fn plan_by_rule(config: &Config, change: &Change) -> Vec<(usize, Plan)> {
    let (ChangeBody::Row(row) | ChangeBody::Replaced(row)) = &change.body else {
        return Vec::new();
    };
    let mut rendered = String::new();
    config
        .rules_for_indexed(&row.layout.table)
        .map(|(index, rule)| {
            let mut plan = Plan::default();
            plan_rule(
                &mut plan,
                (index, rule),
                row,
                change.position,
                &mut rendered,
            );
            (index, plan)
        })
        .collect()
}

/// A derived rule's lookups (see `config::auto`) are asked for the changed row's value of their
/// input column: the tail runs them before applying the plan (`apply::lookups`). A NULL reaches
/// no key (an equality with NULL is never true); a column the row's capture did not record
/// drops everything, as a template needing it would.
fn ask_lookups(
    plan: &mut Plan,
    (index, rule): (usize, &Rule),
    layout: &Layout,
    image: &[Value],
    position: u64,
) {
    for (number, lookup) in rule.lookups.iter().enumerate() {
        match layout.value(image, &lookup.lookup.input) {
            None => plan.flush_all = Some(position),
            Some(Value::Null) => {}
            Some(value) => {
                let ask = plan.lookups.entry((index, number)).or_default();
                ask.values.push(value.clone());
                ask.position = ask.position.max(position);
            }
        }
    }
}

/// An operator's action, at its marker's position: a key is deleted, a tag invalidated, a
/// family or everything flushed (values read before the position are not served).
fn plan_admin(plan: &mut Plan, action: &AdminAction, position: u64) {
    let latest = |mark: &mut u64| *mark = (*mark).max(position);
    match action {
        AdminAction::Key(key) => {
            let action = plan.keys.entry(key.clone()).or_insert(KeyAction {
                strategy: Strategy::Delete,
                position,
            });
            latest(&mut action.position);
        }
        AdminAction::Tag(tag) => latest(plan.tags.entry(tag.clone()).or_insert(0)),
        AdminAction::Family(pattern) => {
            latest(plan.flush_families.entry(pattern.clone()).or_insert(0));
        }
        AdminAction::All => plan.flush_all = Some(position),
    }
}

enum Rendered {
    /// The key (or tag) is in the buffer.
    Key,
    /// A column the template needs is NULL: no key is named.
    Null,
    /// A column the template needs was not captured for this row (the rules changed since).
    Uncaptured,
}

fn render(template: &Template, layout: &Layout, image: &[Value], out: &mut String) -> Rendered {
    let mut uncaptured = false;
    let rendered = template.render_into(out, |column| {
        let value = layout.value(image, column);
        uncaptured |= value.is_none();
        value
    });
    match rendered {
        Some(()) => Rendered::Key,
        None if uncaptured => Rendered::Uncaptured,
        None => Rendered::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RowChange;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            r#"database = "x.db"
[[rules]]
table = "reviews"
keys = ["book:{book_id}", "top"]
strategy = "write-through"
[[rules]]
table = "reviews"
on = ["delete"]
keys = ["top"]
tags = ["user:{user_id}"]
"#,
            "test.toml",
            Path::new("."),
        )
        .expect("valid")
    }

    fn change(position: u64, op: Op, old: Option<[i64; 2]>, new: Option<[i64; 2]>) -> Change {
        let layout = Arc::new(Layout {
            table: "reviews".into(),
            columns: vec!["book_id".into(), "user_id".into()],
        });
        let image = |v: [i64; 2]| v.iter().map(|&i| Value::Integer(i)).collect();
        Change {
            position,
            written_ms: None,
            body: ChangeBody::Row(RowChange {
                layout,
                op,
                old: old.map(image),
                new: new.map(image),
            }),
        }
    }

    #[test]
    fn an_update_moving_a_row_touches_the_old_and_the_new_key() {
        let plan = plan(
            &config(),
            &[change(7, Op::Update, Some([3, 1]), Some([5, 1]))],
        );
        let mut keys: Vec<_> = plan.keys.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["book:3", "book:5", "top"]);
        assert!(plan.tags.is_empty(), "the delete-only rule did not fire");
    }

    #[test]
    fn a_batch_merges_actions_per_key() {
        let plan = plan(
            &config(),
            &[
                change(1, Op::Insert, None, Some([3, 1])),
                change(2, Op::Delete, Some([3, 9]), None),
            ],
        );
        assert_eq!(plan.keys["book:3"].position, 2);
        assert_eq!(plan.keys["top"].strategy, Strategy::WriteThrough);
        assert_eq!(plan.tags["user:9"], 2);
    }

    #[test]
    fn admin_actions_in_the_outbox_plan_what_they_name_at_their_position() {
        let admin = |position: u64, text: &str| Change {
            position,
            written_ms: None,
            body: crate::capture::read_marker(position as i64, Some(text)),
        };
        let plan = plan(
            &config(),
            &[
                change(1, Op::Insert, None, Some([3, 1])),
                admin(2, r#"{"key":"book:3"}"#),
                admin(3, r#"{"tag":"books"}"#),
                admin(4, r#"{"family":"user:{id}"}"#),
                admin(5, r#""all""#),
            ],
        );
        let book = plan.keys["book:3"];
        assert_eq!((book.strategy, book.position), (Strategy::WriteThrough, 2));
        assert_eq!(plan.tags["books"], 3);
        assert_eq!(plan.flush_families["user:{id}"], 4);
        assert_eq!(plan.flush_all, Some(5));
        // A marker whose action cannot be read drops everything rather than nothing.
        assert_eq!(super::plan(&config(), &[admin(9, "{")]).flush_all, Some(9));
    }

    #[test]
    fn an_unreadable_change_flushes_its_table_or_everything() {
        let unreadable = |position: u64, table: Option<&str>| Change {
            position,
            written_ms: None,
            body: ChangeBody::Unreadable(Unreadable {
                table: table.map(Arc::from),
                reason: "bad".into(),
            }),
        };
        let of_reviews = plan(&config(), &[unreadable(4, Some("reviews"))]);
        assert_eq!(of_reviews.flush_all, None);
        assert_eq!(of_reviews.flush_tables[&Arc::<str>::from("reviews")], 4);
        assert!(of_reviews.keys.is_empty() && of_reviews.tags.is_empty());
        assert_eq!(plan(&config(), &[unreadable(5, None)]).flush_all, Some(5));
    }
}
