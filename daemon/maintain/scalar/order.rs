//! SQLite's order of values, as `min()`/`max()` compare them (`sqlite3MemCompare`): NULL, then
//! numbers (integers and reals compared exactly, not through a double), then text (by the
//! column's collation: only BINARY is followed here), then blobs (memcmp, then length).

use std::cmp::Ordering;

use rusqlite::types::Value;

/// `a` against `b` in SQLite's order, or None when that cannot be told here (two texts under a
/// collation other than BINARY of a UTF-8 database: `binary_text` false).
pub(super) fn compare(a: &Value, b: &Value, binary_text: bool) -> Option<Ordering> {
    let by_class = class(a).cmp(&class(b));
    if by_class != Ordering::Equal {
        return Some(by_class);
    }
    match (a, b) {
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        (Value::Integer(x), Value::Integer(y)) => Some(x.cmp(y)),
        (Value::Real(x), Value::Real(y)) => x.partial_cmp(y),
        (Value::Integer(i), Value::Real(r)) => integer_real(*i, *r),
        (Value::Real(r), Value::Integer(i)) => integer_real(*i, *r).map(Ordering::reverse),
        (Value::Text(x), Value::Text(y)) if binary_text => Some(x.as_bytes().cmp(y.as_bytes())),
        (Value::Blob(x), Value::Blob(y)) => Some(x.as_slice().cmp(y.as_slice())),
        _ => None,
    }
}

/// The same value: same type, same bytes (a real's sign of zero included). An integer and a real
/// that compare equal are not the same: which one `min()` returns depends on the scan order.
pub(super) fn identical(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Real(x), Value::Real(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

fn class(value: &Value) -> u8 {
    match value {
        Value::Null => 0,
        Value::Integer(_) | Value::Real(_) => 1,
        Value::Text(_) => 2,
        Value::Blob(_) => 3,
    }
}

/// `sqlite3IntFloatCompare`: an integer against a real, exactly.
fn integer_real(i: i64, r: f64) -> Option<Ordering> {
    if r.is_nan() {
        return None;
    }
    if r < -9_223_372_036_854_775_808.0 {
        return Some(Ordering::Greater);
    }
    if r >= 9_223_372_036_854_775_808.0 {
        return Some(Ordering::Less);
    }
    // In range: the cast truncates toward zero without saturating.
    let truncated = r as i64;
    match i.cmp(&truncated) {
        Ordering::Equal => (i as f64).partial_cmp(&r),
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// Every pair of a set of awkward values compared here and by SQLite (`?1 < ?2`, `?1 = ?2`,
    /// bound values have no affinity: SQLite's plain order, BINARY collation).
    #[test]
    fn the_order_is_sqlites() {
        let conn = Connection::open_in_memory().expect("open");
        let values = [
            Value::Null,
            Value::Integer(i64::MIN),
            Value::Integer(-1),
            Value::Integer(0),
            Value::Integer(1),
            Value::Integer(9_007_199_254_740_993),
            Value::Integer(i64::MAX),
            Value::Real(-9.3e18),
            Value::Real(-0.0),
            Value::Real(0.0),
            Value::Real(0.5),
            Value::Real(1.0),
            Value::Real(9_007_199_254_740_992.0),
            Value::Real(9.223_372_036_854_776e18),
            Value::Real(9.223_372_036_854_774e18),
            Value::Real(1e300),
            Value::Text(String::new()),
            Value::Text("4".to_owned()),
            Value::Text("a".to_owned()),
            Value::Text("ab".to_owned()),
            Value::Text("B".to_owned()),
            Value::Text("é".to_owned()),
            Value::Blob(vec![]),
            Value::Blob(vec![0]),
            Value::Blob(vec![1, 2]),
        ];
        let mut stmt = conn
            .prepare("SELECT CASE WHEN ?1 < ?2 THEN -1 WHEN ?1 > ?2 THEN 1 ELSE 0 END")
            .expect("prepare");
        for a in &values {
            for b in &values {
                if matches!(a, Value::Null) || matches!(b, Value::Null) {
                    continue; // `<` on NULL is NULL; the class order is checked below
                }
                let sqlite: i64 = stmt.query_row([a, b], |row| row.get(0)).expect("compare");
                let ours = compare(a, b, true).expect("comparable");
                assert_eq!(ours as i64, sqlite, "{a:?} vs {b:?}");
            }
        }
        assert_eq!(
            compare(&Value::Null, &Value::Integer(i64::MIN), true),
            Some(Ordering::Less)
        );
        assert_eq!(
            compare(&Value::Text("a".into()), &Value::Text("B".into()), false),
            None
        );
    }
}
