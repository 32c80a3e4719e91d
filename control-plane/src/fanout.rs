//! Fan-out of answers to discovery streams.
//!
//! Every watched answer (a destination as a client namespace sees it, a workload's inbound
//! policy) has one entry here: its current value, encoded once, in a `watch` channel that each
//! stream watching it subscribes to. When the mesh index changes, [`Fanout::update`] recomputes
//! each watched answer once (not once per stream), and sends only those that changed: a stream
//! whose answer did not change is not woken, and an answer shared by a thousand streams is
//! encoded once and sent as the same bytes.
//!
//! Answers are whole replacements, so a stream that falls behind skips to the latest: a lost or
//! skipped message never leaves a proxy half-updated.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use prost::Message;
use strait_api::encoded::Encoded;
use tokio::sync::watch;

/// Subscriptions to answers keyed by `K`.
pub struct Fanout<K, M> {
    state: Mutex<State<K, M>>,
}

struct State<K, M> {
    entries: HashMap<K, Entry<M>>,
    /// Encodings by answer (pointer of its `Arc`, held so the address is not reused): keys
    /// that share an answer (one service seen from many namespaces) share its encoding.
    encodings: HashMap<usize, (Arc<M>, Encoded<M>)>,
    subscribes: u64,
}

struct Entry<M> {
    source: Arc<M>,
    tx: watch::Sender<Encoded<M>>,
}

/// What one [`Fanout::update`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Watched answers.
    pub answers: usize,
    /// Answers that changed (and were sent).
    pub changed: usize,
    /// Bytes encoded this round (each changed answer once).
    pub encoded_bytes: usize,
}

impl<K, M> Default for Fanout<K, M> {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                entries: HashMap::new(),
                encodings: HashMap::new(),
                subscribes: 0,
            }),
        }
    }
}

fn key_of<M>(a: &Arc<M>) -> usize {
    Arc::as_ptr(a) as usize
}

impl<K, M> State<K, M>
where
    M: Message + PartialEq,
{
    fn encoding(&mut self, source: &Arc<M>) -> Encoded<M> {
        self.encodings
            .entry(key_of(source))
            .or_insert_with(|| (source.clone(), Encoded::new(&**source)))
            .1
            .clone()
    }

    /// Drops entries no stream watches any more, and encodings no entry uses.
    fn prune(&mut self) {
        self.entries.retain(|_, e| e.tx.receiver_count() > 0);
        let used: std::collections::HashSet<usize> =
            self.entries.values().map(|e| key_of(&e.source)).collect();
        self.encodings.retain(|k, _| used.contains(k));
    }
}

impl<K, M> Fanout<K, M>
where
    K: Eq + Hash + Clone,
    M: Message + PartialEq,
{
    fn lock(&self) -> std::sync::MutexGuard<'_, State<K, M>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer for `key`, now and on every change. `answer` computes it (from the current
    /// index) when no stream watches it yet.
    pub fn subscribe(
        &self,
        key: K,
        answer: impl FnOnce() -> Arc<M>,
    ) -> watch::Receiver<Encoded<M>> {
        let mut state = self.lock();
        state.subscribes += 1;
        if state.subscribes.is_multiple_of(1024) {
            state.prune();
        }
        if let Some(entry) = state.entries.get(&key) {
            return entry.tx.subscribe();
        }
        let source = answer();
        let (tx, rx) = watch::channel(state.encoding(&source));
        state.entries.insert(key, Entry { source, tx });
        rx
    }

    /// Recomputes every watched answer with `answer` (from the newest index) and sends those
    /// that changed. Answers the index shares between versions (the same `Arc`) are skipped
    /// without comparing.
    pub fn update(&self, answer: impl Fn(&K) -> Arc<M>) -> Round {
        // Which answers changed, under the lock (lookups only)...
        let changed: Vec<(K, Arc<M>)> = {
            let mut state = self.lock();
            state.prune();
            state
                .entries
                .iter()
                .filter_map(|(key, entry)| {
                    let new = answer(key);
                    let same = Arc::ptr_eq(&entry.source, &new) || *entry.source == *new;
                    (!same).then(|| (key.clone(), new))
                })
                .collect()
        };
        let mut round = Round {
            answers: 0,
            changed: changed.len(),
            encoded_bytes: 0,
        };
        // ...encoded outside it (a large answer takes milliseconds), once per distinct answer...
        let mut encoded: HashMap<usize, Encoded<M>> = HashMap::new();
        for (_, new) in &changed {
            encoded.entry(key_of(new)).or_insert_with(|| {
                let e = Encoded::new(&**new);
                round.encoded_bytes += e.len();
                e
            });
        }
        // ...and sent under it again. Only this function changes an existing entry, so what was
        // compared above is still what the entry holds.
        let mut state = self.lock();
        for (key, new) in changed {
            let Some(bytes) = encoded.get(&key_of(&new)).cloned() else {
                continue;
            };
            state
                .encodings
                .entry(key_of(&new))
                .or_insert_with(|| (new.clone(), bytes.clone()));
            if let Some(entry) = state.entries.get_mut(&key) {
                entry.source = new;
                entry.tx.send_replace(bytes);
            }
        }
        // Encodings the changed entries no longer use go at the next prune.
        round.answers = state.entries.len();
        round
    }

    /// Watched answers (entries with at least one stream, as of the last prune).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_api::discovery::TrustAnchors;

    fn msg(s: &str) -> Arc<TrustAnchors> {
        Arc::new(TrustAnchors { pem: s.into() })
    }

    #[test]
    fn streams_of_one_answer_share_it_and_only_changed_answers_wake_theirs() {
        let fanout: Fanout<&str, TrustAnchors> = Fanout::default();
        let a = msg("a");
        let mut a1 = fanout.subscribe("a", || a.clone());
        let mut a2 = fanout.subscribe("a", || panic!("computed once"));
        let b = msg("b");
        let mut b1 = fanout.subscribe("b", || b.clone());
        assert_eq!(fanout.len(), 2);
        assert_eq!(
            a1.borrow_and_update().decode().map(|m| m.pem),
            Ok("a".into())
        );
        assert_eq!(a2.borrow_and_update().bytes(), a1.borrow().bytes());
        b1.borrow_and_update();

        // "a" changes, "b" is the same Arc: only a's streams see a change.
        let round = fanout.update(|k| if *k == "a" { msg("a2") } else { b.clone() });
        assert_eq!(round.changed, 1);
        assert_eq!(round.answers, 2);
        assert!(a1.has_changed().unwrap_or(false));
        assert!(a2.has_changed().unwrap_or(false));
        assert!(!b1.has_changed().unwrap_or(true));
        assert_eq!(
            a1.borrow_and_update().decode().map(|m| m.pem),
            Ok("a2".into())
        );
        a2.borrow_and_update();
        // An equal answer in a new Arc is no change either.
        let round = fanout.update(|k| msg(if *k == "a" { "a2" } else { "b" }));
        assert_eq!(round.changed, 0);
        assert!(!a1.has_changed().unwrap_or(true));
        assert!(!a2.has_changed().unwrap_or(true));
    }

    #[test]
    fn keys_with_the_same_answer_share_one_encoding_and_unwatched_keys_are_dropped() {
        let fanout: Fanout<u32, TrustAnchors> = Fanout::default();
        let shared = msg(&"x".repeat(1000));
        let r1 = fanout.subscribe(1, || shared.clone());
        let r2 = fanout.subscribe(2, || shared.clone());
        // The same bytes, not a copy.
        assert_eq!(r1.borrow().bytes().as_ptr(), r2.borrow().bytes().as_ptr());
        let next = msg(&"y".repeat(1000));
        let round = fanout.update(|_| next.clone());
        assert_eq!(round.changed, 2);
        assert!(round.encoded_bytes < 1100, "{round:?}");
        drop(r1);
        let round = fanout.update(|_| next.clone());
        assert_eq!(round.answers, 1);
        drop(r2);
        assert_eq!(fanout.update(|_| next.clone()).answers, 0);
        assert!(fanout.is_empty());
    }
}
