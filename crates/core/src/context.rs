//! What a backend's `open` is given: the daemon's runtime and the resources its disks share.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};

use crate::lock;

/// Owned by the daemon and handed to every [`BackendSpec::open`](crate::BackendSpec::open),
/// reloads included: the runtime a backend's background work runs on, and what disks share
/// (SMB sessions, map server connections, throttles). A library keeps each shared resource as
/// a type of its own here ([`OpenContext::shared`]), so two daemons in one process (tests)
/// share nothing.
#[derive(Clone)]
pub struct OpenContext(Arc<Inner>);

struct Inner {
    runtime: tokio::runtime::Handle,
    shared: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl OpenContext {
    pub fn new(runtime: tokio::runtime::Handle) -> OpenContext {
        OpenContext(Arc::new(Inner {
            runtime,
            shared: Mutex::default(),
        }))
    }

    /// The runtime backends run their background work on (network connections, timers, the
    /// blocking pool).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.0.runtime
    }

    /// The one `T` of this context, made by the first caller.
    pub fn shared<T: Default + Send + Sync + 'static>(&self) -> Arc<T> {
        let mut shared = lock(&self.0.shared);
        let any = shared
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()));
        any.clone()
            .downcast::<T>()
            .expect("entries are keyed by their type")
    }
}

/// Values shared by key for as long as anyone holds them: a disk joining the SMB session or
/// map connection another disk opened, which goes once the last disk using it has.
pub struct WeakMap<K, V>(Mutex<HashMap<K, Weak<V>>>);

impl<K, V> Default for WeakMap<K, V> {
    fn default() -> Self {
        WeakMap(Mutex::default())
    }
}

impl<K: Eq + Hash, V> WeakMap<K, V> {
    /// The value held under `key`, if someone still holds it.
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        lock(&self.0).get(key).and_then(Weak::upgrade)
    }

    /// The value held under `key`, or `make()`'s, kept from now on; `made` says which.
    pub fn get_or_insert_with(&self, key: K, make: impl FnOnce() -> Arc<V>) -> (Arc<V>, bool) {
        let mut map = lock(&self.0);
        map.retain(|_, v| v.strong_count() > 0);
        if let Some(v) = map.get(&key).and_then(Weak::upgrade) {
            return (v, false);
        }
        let v = make();
        map.insert(key, Arc::downgrade(&v));
        (v, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_share_within_and_not_across() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (a, b) = (
            OpenContext::new(rt.handle().clone()),
            OpenContext::new(rt.handle().clone()),
        );
        let m1 = a.shared::<WeakMap<u32, String>>();
        let (v, made) = m1.get_or_insert_with(1, || Arc::new("one".into()));
        assert!(made);
        let (w, made) = a
            .shared::<WeakMap<u32, String>>()
            .get_or_insert_with(1, || unreachable!());
        assert!(!made && Arc::ptr_eq(&v, &w));
        assert!(
            b.shared::<WeakMap<u32, String>>().get(&1).is_none(),
            "another daemon's"
        );
        drop((v, w));
        assert!(m1.get(&1).is_none(), "gone with its last holder");
    }
}
