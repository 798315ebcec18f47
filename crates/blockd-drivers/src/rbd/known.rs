//! Objects of an image known to exist, so that block status need not ask
//! librbd again (QEMU asks `rbd_diff_iterate2` for every query; an NBD
//! export asks for every read, to send holes, and each answer costs a
//! trip to the blocking pool and librbd's object-map walk).
//!
//! Only the positive answer is kept: "this object exists, read it as
//! data". That answer is always correct for a reader (data that happens
//! to be zeroes is still data), so another client discarding an object
//! behind this one's back makes the node report data where a hole is,
//! never a hole where data is. This node's own discards, unmapping
//! zero writes and truncation forget what they touch; writes remember.

use std::sync::Mutex;

/// A set of object numbers (a growable bitmap).
#[derive(Debug, Default)]
pub struct Known {
    words: Mutex<Vec<u64>>,
}

impl Known {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.words.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether object `i` is known to exist.
    #[cfg(test)]
    fn get(&self, i: u64) -> bool {
        self.run(i, 1) == 1
    }

    /// How many objects from `i` on (at most `max`) are known to exist.
    pub fn run(&self, i: u64, max: u64) -> u64 {
        let w = self.lock();
        let mut n = 0;
        while n < max {
            let j = i + n;
            if w.get((j / 64) as usize)
                .is_none_or(|x| x & (1 << (j % 64)) == 0)
            {
                break;
            }
            n += 1;
        }
        n
    }

    /// Remembers objects `first..=last` as existing.
    pub fn set(&self, first: u64, last: u64) {
        let mut w = self.lock();
        let need = (last / 64 + 1) as usize;
        if w.len() < need {
            w.resize(need, 0);
        }
        for i in first..=last {
            w[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Forgets objects `first..=last`.
    pub fn clear(&self, first: u64, last: u64) {
        let mut w = self.lock();
        for i in first..=last.min((w.len() as u64 * 64).saturating_sub(1)) {
            w[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    /// Forgets everything.
    pub fn clear_all(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets_ranges() {
        let k = Known::default();
        assert!(!k.get(3));
        k.set(3, 130);
        assert!(k.get(3) && k.get(64) && k.get(130) && !k.get(131) && !k.get(2));
        assert_eq!(k.run(100, 100), 31);
        assert_eq!(k.run(0, 5), 0);
        k.clear(60, 70);
        assert_eq!(k.run(3, 100), 57);
        assert!(!k.get(65) && k.get(71));
        k.clear(1000, 2000);
        k.clear_all();
        assert!(!k.get(3));
    }
}
