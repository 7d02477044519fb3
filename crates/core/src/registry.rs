//! Plugins: each backend registers a name and parses its own part of the YAML.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::backend::BlockBackend;
use crate::context::OpenContext;
use crate::error::Result;

/// What a plugin may know about the disk it serves, besides its own options.
#[derive(Debug, Clone)]
pub struct DiskContext {
    pub name: String,
    pub read_only: bool,
    /// Whether the disk takes image locks (the disk's `lock`, default true).
    pub lock: bool,
}

/// A parsed, validated backend configuration that can be opened later.
#[async_trait]
pub trait BackendSpec: Send + Sync + fmt::Debug {
    /// One line for `twinpath check`, e.g. `file /var/lib/img.raw (direct)`.
    fn describe(&self) -> String;

    /// The image this disk serves, named so that two disks of one config on the same image
    /// compare equal (a path, `//server/share/path`); `None` where there is no such thing.
    fn image(&self) -> Option<String> {
        None
    }

    /// Opens the backing store, on `ctx`'s runtime and with what disks share from it. Errors
    /// carry the object that failed (path, share, ...).
    async fn open(&self, ctx: &OpenContext) -> Result<Arc<dyn BlockBackend>>;
}

/// A backend plugin.
pub trait Plugin: Send + Sync {
    /// The `backend.type` value that selects this plugin.
    fn name(&self) -> &'static str;

    /// Parses the plugin's options: the `backend` mapping without its `type` key.
    fn parse(
        &self,
        disk: &DiskContext,
        options: serde_yaml::Value,
    ) -> std::result::Result<Box<dyn BackendSpec>, OptionError>;
}

/// A plugin option that could not be accepted; `key` is the dotted path inside `backend`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionError {
    pub key: Option<String>,
    pub message: String,
}

impl OptionError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        OptionError {
            key: Some(key.into()),
            message: message.into(),
        }
    }
}

impl fmt::Display for OptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(k) => write!(f, "key `{k}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Deserialises plugin options, reporting the offending key. Plugins should mark their option
/// structs `#[serde(deny_unknown_fields)]`.
pub fn parse_options<T: DeserializeOwned>(
    options: serde_yaml::Value,
) -> std::result::Result<T, OptionError> {
    serde_path_to_error::deserialize(options).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        OptionError {
            key: (path != ".").then_some(path),
            message,
        }
    })
}

/// Splits a plugin's options in two: the keys the options struct `T` reads, and the rest. For
/// a plugin whose options are another library's plus its own, without a list of either's keys
/// to keep by hand: the rest goes to the other's parser, which names any key neither knows.
pub fn split_options<T: DeserializeOwned>(
    options: serde_yaml::Value,
) -> std::result::Result<(serde_yaml::Value, serde_yaml::Value), OptionError> {
    let serde_yaml::Value::Mapping(mut rest) = options else {
        return Err(OptionError {
            key: None,
            message: "backend options must be a mapping".into(),
        });
    };
    let mut own = serde_yaml::Mapping::new();
    for key in serde_aux::serde_introspection::serde_introspect::<T>() {
        if let Some(v) = rest.remove(*key) {
            own.insert((*key).into(), v);
        }
    }
    Ok((
        serde_yaml::Value::Mapping(own),
        serde_yaml::Value::Mapping(rest),
    ))
}

/// The plugins this binary was built with.
#[derive(Default)]
pub struct Registry {
    plugins: BTreeMap<&'static str, Box<dyn Plugin>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, plugin: Box<dyn Plugin>) {
        self.plugins.insert(plugin.name(), plugin);
    }

    pub fn get(&self, name: &str) -> Option<&dyn Plugin> {
        self.plugins.get(name).map(|p| p.as_ref())
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.plugins.keys().copied().collect()
    }
}
