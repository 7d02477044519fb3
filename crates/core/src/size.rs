//! Sizes in config files: `4294967296`, `4G`, `4GiB` and `512M` all mean binary multiples, as
//! disk sizes do everywhere else on a VM host (qemu-img, truncate).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// A text that is not a size.
#[derive(Debug, thiserror::Error)]
#[error("`{text}` is not a size ({source}); use bytes or a suffix such as 512M or 4G")]
pub struct NotASize {
    pub text: String,
    source: parse_size::Error,
}

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, NotASize> {
        parse_size::Config::new()
            .with_binary()
            .parse_size(s.trim())
            .map(ByteSize)
            .map_err(|source| NotASize {
                text: s.to_owned(),
                source,
            })
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        let mut v = self.0;
        while unit + 1 < UNITS.len() && v >= 1024 && v.is_multiple_of(1024) {
            v /= 1024;
            unit += 1;
        }
        write!(f, "{v} {}", UNITS[unit])
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes or with a suffix (512M, 4G)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_binary() {
        assert_eq!(ByteSize::parse("4G").unwrap().0, 4 << 30);
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert!(ByteSize::parse("lots").is_err());
        let v: ByteSize = serde_yaml::from_str("1M").unwrap();
        assert_eq!(v.0, 1 << 20);
        let v: ByteSize = serde_yaml::from_str("65536").unwrap();
        assert_eq!(v.0, 65536);
        assert!(serde_yaml::from_str::<ByteSize>("-1").is_err());
        assert_eq!(ByteSize(3 << 30).to_string(), "3 GiB");
    }
}
