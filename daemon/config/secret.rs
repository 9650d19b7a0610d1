//! Secrets the config holds (the admin token, the Redis URL and its password): a type that prints
//! as `***` (Display and Debug), so no error message, log line, status field or `{:?}` of a
//! config can show one. Only `expose` gives the text, where it is used (AUTH, the token check).
//!
//! It also reads itself from the file without quoting what it read: serde's "invalid type"
//! errors name the value (`admin_token = 12345…` written without quotes would be echoed back).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// A secret: shown as `***`, compared and used through `expose`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> de::Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// Takes a string; anything else is refused without repeating it.
struct SecretVisitor;

const NOT_A_STRING: &str =
    "expected a string in quotes (the value is not repeated here: it may be a secret)";

impl<'de> Visitor<'de> for SecretVisitor {
    type Value = Secret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string in quotes")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
        Ok(Secret::new(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Secret, E> {
        Ok(Secret(v))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Secret, E> {
        Err(E::custom(NOT_A_STRING))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(de::Error::custom(NOT_A_STRING))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<Secret, A::Error> {
        Err(de::Error::custom(NOT_A_STRING))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_as_stars_and_is_read_without_being_echoed() {
        let secret = Secret::new("hunter2");
        assert_eq!(
            format!("{secret} {secret:?} {:?}", Some(&secret)),
            "*** *** Some(***)"
        );
        assert_eq!(secret.expose(), "hunter2");
        #[derive(serde::Deserialize)]
        struct File {
            #[allow(dead_code)]
            token: Secret,
        }
        for text in [
            "token = 918273645546372819",
            "token = 91827364554637.2819",
            "token = [\"918273645546372819\"]",
            "token = { a = \"918273645546372819\" }",
            "token = 1979-05-27T07:32:00Z",
        ] {
            let Err(e) = toml::from_str::<File>(text) else {
                panic!("{text} is not a string");
            };
            // `message()`, as `Config::parse` reports it (the full Display quotes the line).
            let said = e.message();
            assert!(!said.contains("918273645546372819"), "{said}");
            assert!(!said.contains("1979"), "{said}");
            assert!(said.contains("expected a string in quotes"), "{said}");
        }
    }
}
