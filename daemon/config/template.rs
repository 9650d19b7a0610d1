//! Key templates and key patterns: strings with `{name}` placeholders.
//!
//! The same syntax serves two purposes. A rule's key template (`book:{book_id}`) is *rendered*
//! from the columns of a changed row; a key family's pattern (`book:{id}`) is *matched* against a
//! requested key to recover the parameters its query binds. `{{` and `}}` stand for literal braces.

use std::fmt;

use rusqlite::types::Value;

use crate::types::Params;

/// Text written so that a template reads it literally (`{` → `{{`, `}` → `}}`).
pub fn escape_braces(text: &str) -> String {
    text.replace('{', "{{").replace('}', "}}")
}

/// One piece of a template: literal text or a named placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    Param(String),
}

/// A parsed template such as `book:{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Why a template could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{` at byte {0} is never closed (write `{{{{` for a literal brace)")]
    Unclosed(usize),
    #[error("`}}` at byte {0} has no matching `{{` (write `}}}}` for a literal brace)")]
    StrayClose(usize),
    #[error(
        "placeholder `{{{0}}}` is not a name (letters, digits and `_`, not starting with a digit)"
    )]
    BadName(String),
    #[error(
        "placeholders `{{{0}}}` and `{{{1}}}` touch; put literal text between them so a key can be split"
    )]
    Adjacent(String, String),
    #[error("the template is empty")]
    Empty,
}

impl Template {
    /// Parses a template. `allow_adjacent` is false for family patterns, whose placeholders must
    /// be separated by literal text so that a requested key splits one way only, and must be
    /// names (letters, digits, `_`); true for rule templates, whose placeholders are column names.
    pub fn parse(source: &str, allow_adjacent: bool) -> Result<Template, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => return Err(TemplateError::StrayClose(at)),
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for (_, n) in chars.by_ref() {
                        if n == '}' {
                            closed = true;
                            break;
                        }
                        name.push(n);
                    }
                    if !closed {
                        return Err(TemplateError::Unclosed(at));
                    }
                    // A row template names columns, which may be any text ("key col"); a
                    // pattern's placeholders become SQL `:name` parameters, so they are names.
                    let valid = if allow_adjacent {
                        !name.is_empty()
                    } else {
                        is_name(&name)
                    };
                    if !valid {
                        return Err(TemplateError::BadName(name));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    } else if let Some(Part::Param(previous)) = parts.last()
                        && !allow_adjacent
                    {
                        return Err(TemplateError::Adjacent(previous.clone(), name));
                    }
                    parts.push(Part::Param(name));
                }
                other => literal.push(other),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template {
            source: source.to_owned(),
            parts,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The placeholder names, in order of appearance, each once.
    pub fn params(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        for part in &self.parts {
            if let Part::Param(name) = part
                && !names.contains(&name.as_str())
            {
                names.push(name);
            }
        }
        names
    }

    /// Whether a key this template renders can match `pattern`: same literal text around the
    /// placeholders (whatever their names), or, for a literal template, a key the pattern
    /// matches. Used to tell which rules refresh which key families.
    pub fn may_match(&self, pattern: &Template) -> bool {
        if self.is_literal() {
            let text: String = self
                .parts
                .iter()
                .map(|p| match p {
                    Part::Literal(text) => text.as_str(),
                    Part::Param(_) => "",
                })
                .collect();
            return pattern.match_key(&text).is_some() || self.parts == pattern.parts;
        }
        self.parts.len() == pattern.parts.len()
            && self
                .parts
                .iter()
                .zip(&pattern.parts)
                .all(|pair| match pair {
                    (Part::Literal(a), Part::Literal(b)) => a == b,
                    (Part::Param(_), Part::Param(_)) => true,
                    _ => false,
                })
    }

    /// The template's text with each placeholder renamed (`book:{id}` → `book:{book_id}`);
    /// None if `rename` has no name for one.
    pub fn rename_params(&self, rename: impl Fn(&str) -> Option<String>) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(&escape_braces(text)),
                Part::Param(name) => {
                    out.push('{');
                    out.push_str(&rename(name)?);
                    out.push('}');
                }
            }
        }
        Some(out)
    }

    /// True when the template has no placeholders.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// The literal text before the first placeholder ("" when the template starts with one):
    /// every key a pattern matches starts with it.
    pub fn leading_literal(&self) -> &str {
        match self.parts.first() {
            Some(Part::Literal(text)) => text,
            _ => "",
        }
    }

    /// How many literal characters the template has: the more, the more specific a pattern.
    pub fn literal_len(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(text) => text.len(),
                Part::Param(_) => 0,
            })
            .sum()
    }

    /// Renders the template, asking `lookup` for each placeholder's value. Returns `None` when a
    /// value is missing or NULL: no key can be named by a NULL, so none is rendered.
    pub fn render<'v>(&self, lookup: impl FnMut(&str) -> Option<&'v Value>) -> Option<String> {
        let mut out = String::with_capacity(self.source.len() + 8);
        self.render_into(&mut out, lookup)?;
        Some(out)
    }

    /// `render` into `out` (cleared first): the tail renders a batch's keys into one buffer,
    /// allocating only for keys not seen before in the batch.
    pub fn render_into<'v>(
        &self,
        out: &mut String,
        mut lookup: impl FnMut(&str) -> Option<&'v Value>,
    ) -> Option<()> {
        out.clear();
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Param(name) => push_value(out, lookup(name)?)?,
            }
        }
        Some(())
    }

    /// Renders with string parameters (a family's tags from the parameters of a requested key).
    pub fn render_with(&self, params: &[(String, String)]) -> Option<String> {
        let mut out = String::with_capacity(self.source.len() + 8);
        for part in &self.parts {
            match part {
                Part::Literal(text) => out.push_str(text),
                Part::Param(name) => {
                    let (_, value) = params.iter().find(|(n, _)| n == name)?;
                    out.push_str(value);
                }
            }
        }
        Some(out)
    }

    /// Matches a key against this pattern, returning the placeholder values in order. A
    /// placeholder takes at least one character and stops at the first occurrence of the literal
    /// that follows it; the last placeholder takes the rest of the key.
    pub fn match_key(&self, key: &str) -> Option<Params> {
        let mut rest = key;
        let mut params = Vec::new();
        let mut parts = self.parts.iter().peekable();
        while let Some(part) = parts.next() {
            match part {
                Part::Literal(text) => rest = rest.strip_prefix(text.as_str())?,
                Part::Param(name) => {
                    let value = match parts.peek() {
                        None => std::mem::take(&mut rest),
                        Some(Part::Literal(next)) => {
                            let is_last_literal = parts.clone().nth(1).is_none();
                            let end = if is_last_literal {
                                if !rest.ends_with(next.as_str()) {
                                    return None;
                                }
                                rest.len() - next.len()
                            } else {
                                // Skip one char so that a placeholder is never empty.
                                let first = rest.chars().next()?.len_utf8();
                                first + rest[first..].find(next.as_str())?
                            };
                            let (value, tail) = rest.split_at(end);
                            rest = tail;
                            value
                        }
                        Some(Part::Param(_)) => return None,
                    };
                    if value.is_empty() {
                        return None;
                    }
                    if let Some((_, earlier)) = params.iter().find(|(n, _)| n == name) {
                        // The same placeholder twice must take the same value.
                        if earlier != value {
                            return None;
                        }
                        continue;
                    }
                    params.push((name.clone(), value.to_owned()));
                }
            }
        }
        rest.is_empty().then_some(params)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Writes a column value as it appears inside a key. Integers and text as themselves, reals in
/// their shortest exact form (`db::real_key_text`, which the binding of key parameters reads back), blobs as lowercase hex. NULL names no key.
/// An integer's decimal digits, without going through `fmt` (every key of a drained batch
/// renders one).
fn push_integer(out: &mut String, value: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        out.push('-');
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

fn push_value(out: &mut String, value: &Value) -> Option<()> {
    use std::fmt::Write;
    match value {
        Value::Null => return None,
        Value::Integer(i) => push_integer(out, *i),
        Value::Real(r) => out.push_str(&crate::db::real_key_text(*r)),
        Value::Text(text) => out.push_str(text),
        Value::Blob(bytes) => {
            for b in bytes {
                let _ = write!(out, "{b:02x}");
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn integers_render_as_their_decimal_digits() {
        for value in [0, 7, -5, 42, 1_000_000, i64::MAX, i64::MIN] {
            let mut out = String::new();
            super::push_integer(&mut out, value);
            assert_eq!(out, value.to_string());
        }
    }

    #[test]
    fn a_rule_template_may_match_a_family_pattern_by_shape() {
        let t = |s: &str| Template::parse(s, true).expect("valid");
        let family = Template::parse("book:{id}", false).expect("valid");
        assert!(t("book:{book_id}").may_match(&family));
        assert!(
            t("book:7").may_match(&family),
            "a literal key the pattern matches"
        );
        assert!(!t("author:{id}").may_match(&family));
        assert!(!t("book:{id}:reviews").may_match(&family));
        let top = Template::parse("top-books", false).expect("valid");
        assert!(t("top-books").may_match(&top));
        assert!(!t("top-authors").may_match(&top));
    }

    use super::*;

    fn pattern(s: &str) -> Template {
        Template::parse(s, false).expect("valid pattern")
    }

    #[test]
    fn a_pattern_recovers_its_parameters() {
        let p = pattern("book:{id}");
        assert_eq!(
            p.match_key("book:42"),
            Some(vec![("id".into(), "42".into())])
        );
        assert_eq!(p.match_key("book:"), None);
        assert_eq!(p.match_key("books:42"), None);
        assert_eq!(
            p.match_key("book:a:b"),
            Some(vec![("id".into(), "a:b".into())])
        );
    }

    #[test]
    fn several_parameters_split_at_the_following_literal() {
        let p = pattern("user:{u}:book:{b}/x");
        assert_eq!(
            p.match_key("user:7:book:9/x"),
            Some(vec![("u".into(), "7".into()), ("b".into(), "9".into())])
        );
        assert_eq!(p.match_key("user:7:book:9/y"), None);
        assert_eq!(pattern("top-books").match_key("top-books"), Some(vec![]));
        assert_eq!(pattern("book:{id}").leading_literal(), "book:");
        assert_eq!(pattern("{slug}:x").leading_literal(), "");
        assert_eq!(pattern("{{x}}:{id}").leading_literal(), "{x}:");
        assert_eq!(pattern("top-books").match_key("top-books2"), None);
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        assert_eq!(
            Template::parse("a{b", false),
            Err(TemplateError::Unclosed(1))
        );
        assert_eq!(
            Template::parse("a}b", false),
            Err(TemplateError::StrayClose(1))
        );
        assert!(matches!(
            Template::parse("{1x}", false),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            Template::parse("{a}{b}", false),
            Err(TemplateError::Adjacent(..))
        ));
        assert!(Template::parse("{a}{b}", true).is_ok());
        assert_eq!(Template::parse("", true), Err(TemplateError::Empty));
        let braces = Template::parse("x{{y}}", false).expect("escaped braces");
        assert_eq!(braces.match_key("x{y}"), Some(vec![]));
    }

    #[test]
    fn rendering_uses_the_row_and_skips_nulls() {
        let t = Template::parse("book:{book_id}", true).expect("valid");
        let v = Value::Integer(3);
        assert_eq!(t.render(|_| Some(&v)).as_deref(), Some("book:3"));
        assert_eq!(t.render(|_| Some(&Value::Null)), None);
        let text = Value::Text("é:/{".into());
        assert_eq!(t.render(|_| Some(&text)).as_deref(), Some("book:é:/{"));
        assert_eq!(t.render(|_| None), None);
    }
}
