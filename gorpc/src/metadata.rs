//! Key-value pairs sent with a call and with its response.

use std::borrow::Cow;

use bytes::Bytes;
use gorpc_proto::MetadataIter;

/// Ordered key-value pairs. Keys may repeat; lookups return the first match. Empty metadata
/// does not allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    entries: Vec<(Cow<'static, str>, Bytes)>,
}

impl Metadata {
    /// No entries.
    pub fn new() -> Self {
        Metadata::default()
    }

    /// Adds an entry, keeping any existing ones with the same key.
    pub fn append(&mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Bytes>) {
        self.entries.push((key.into(), value.into()));
    }

    /// Replaces every entry for `key` with one.
    pub fn insert(&mut self, key: impl Into<Cow<'static, str>>, value: impl Into<Bytes>) {
        let key = key.into();
        self.entries.retain(|(k, _)| *k != key);
        self.entries.push((key, value.into()));
    }

    /// The first value for `key`.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The first value for `key`, if it is UTF-8.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Removes the first entry for `key` and returns its value; later ones stay.
    pub fn remove(&mut self, key: &str) -> Option<Bytes> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.remove(i).1)
    }

    /// Every entry in order, repeated keys included.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> + Clone {
        self.entries.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// Entries, counting each repeat of a key.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends every entry of `other`, after the ones here.
    pub(crate) fn append_all(&mut self, other: Metadata) {
        if self.entries.is_empty() {
            self.entries = other.entries;
        } else {
            self.entries.extend(other.entries);
        }
    }

    /// Copies received metadata out of a frame head; values share the frame's buffer.
    pub(crate) fn from_wire(iter: MetadataIter<'_>, frame: &Bytes) -> Self {
        let entries = iter
            .map(|(k, v)| (Cow::Owned(k.to_owned()), frame_slice(frame, v)))
            .collect();
        Metadata { entries }
    }
}

/// `value` as a `Bytes` sharing `frame`'s allocation when it points into it.
fn frame_slice(frame: &Bytes, value: &[u8]) -> Bytes {
    let start = frame.as_ptr() as usize;
    let at = value.as_ptr() as usize;
    if at >= start && at + value.len() <= start + frame.len() {
        frame.slice_ref(value)
    } else {
        Bytes::copy_from_slice(value)
    }
}

impl<K: Into<Cow<'static, str>>, V: Into<Bytes>> FromIterator<(K, V)> for Metadata {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Metadata {
            entries: iter
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }
}

/// The metadata key of a server's hint of how long to wait before trying again, in whole
/// milliseconds (gRPC's name for it): [`Status::retry_after`](crate::Status::retry_after)
/// travels in it.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// `status` with the retry hint `metadata` carries, if any.
pub(crate) fn with_retry_hint(status: crate::Status, metadata: &Metadata) -> crate::Status {
    match metadata
        .get_str(RETRY_PUSHBACK)
        .and_then(|ms| ms.trim().parse::<u64>().ok())
    {
        Some(ms) => status.with_retry_after(std::time::Duration::from_millis(ms)),
        None => status,
    }
}
