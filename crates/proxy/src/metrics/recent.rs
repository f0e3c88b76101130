//! Metric handles a connection keeps for the label sets its requests
//! repeat.
//!
//! Fetching a metric from its family hashes the whole label set (Istio's
//! has twenty-odd strings) under the family's lock. A connection's
//! requests almost always repeat the same few label sets, so the
//! connection fetches each once and keeps the handles (counters and
//! histograms share their value with the family, so counting through a
//! kept handle is counting in the family). A handful are kept, the oldest
//! replaced first: a connection whose label sets keep changing only
//! fetches as often as it did without.

use std::sync::{Mutex, PoisonError};

/// How many label sets one connection keeps.
const SLOTS: usize = 8;

/// Up to [`SLOTS`] keys and the handles fetched for them.
pub struct Recent<K, V> {
    slots: Mutex<Slots<K, V>>,
}

struct Slots<K, V> {
    entries: Vec<(K, V)>,
    /// The entry replaced next once all slots are taken.
    next: usize,
}

impl<K, V> Default for Recent<K, V> {
    fn default() -> Self {
        Recent {
            slots: Mutex::new(Slots {
                entries: Vec::new(),
                next: 0,
            }),
        }
    }
}

impl<K, V: Clone> Recent<K, V> {
    /// The handles kept for the first key `matches` accepts, or those
    /// `fetch` makes (and which are then kept).
    pub fn get(&self, matches: impl Fn(&K) -> bool, fetch: impl FnOnce() -> (K, V)) -> V {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, handles)) = slots.entries.iter().find(|(key, _)| matches(key)) {
            return handles.clone();
        }
        let (key, handles) = fetch();
        if slots.entries.len() < SLOTS {
            slots.entries.push((key, handles.clone()));
        } else {
            let next = slots.next;
            slots.entries[next] = (key, handles.clone());
            slots.next = (next + 1) % SLOTS;
        }
        handles
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_key_is_fetched_once_while_it_is_kept() {
        let recent = Recent::<u32, u32>::default();
        let fetched = Cell::new(0);
        let get = |k: u32| {
            recent.get(
                |key| *key == k,
                || {
                    fetched.set(fetched.get() + 1);
                    (k, k * 10)
                },
            )
        };
        assert_eq!(get(1), 10);
        assert_eq!(get(1), 10);
        assert_eq!(get(2), 20);
        assert_eq!(get(1), 10);
        assert_eq!(fetched.get(), 2);
    }

    #[test]
    fn beyond_its_slots_the_oldest_is_replaced() {
        let recent = Recent::<usize, usize>::default();
        let fetched = Cell::new(0);
        let get = |k: usize| {
            recent.get(
                |key| *key == k,
                || {
                    fetched.set(fetched.get() + 1);
                    (k, k)
                },
            )
        };
        for k in 0..=SLOTS {
            get(k);
        }
        assert_eq!(fetched.get(), SLOTS + 1);
        // 0 made room for SLOTS; 1 is still kept.
        get(1);
        assert_eq!(fetched.get(), SLOTS + 1);
        get(0);
        assert_eq!(fetched.get(), SLOTS + 2);
    }
}
