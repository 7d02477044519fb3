//! The order in which a queue's finished requests go into its used ring.
//!
//! Requests run concurrently and finish in any order, but the used ring takes them in the
//! order the driver made them available. A frontend whose backend died (killed, crashed)
//! cannot ask it where it stopped: QEMU restarts the queue at the used ring's index, so every
//! request before that index must be done and none after it. A request put in the used ring
//! ahead of an earlier one breaks both: the new backend takes it again (by then its buffers
//! may hold other data of the guest's, so a write so replayed puts stale data on the disk),
//! and never takes the earlier one (the guest waits for it for ever).

use std::collections::VecDeque;

/// A queue's requests in line, from the oldest the used ring does not hold yet.
#[derive(Default)]
pub(crate) struct UsedOrder {
    /// One entry per request in line: `(head, used length)` once it finished.
    line: VecDeque<Option<(u16, u32)>>,
    /// The number of the request at the front of `line`.
    front: u64,
}

impl UsedOrder {
    /// Puts the request the driver made available next in line; its number in line.
    pub(crate) fn join(&mut self) -> u64 {
        self.line.push_back(None);
        self.front + self.line.len() as u64 - 1
    }

    /// Request number `seq` finished with `head` and `used_len`. A number that is no longer in
    /// line (see [`UsedOrder::forget`]) is ignored.
    pub(crate) fn finish(&mut self, seq: u64, head: u16, used_len: u32) {
        let at = seq
            .checked_sub(self.front)
            .and_then(|at| usize::try_from(at).ok());
        if let Some(entry) = at.and_then(|at| self.line.get_mut(at)) {
            *entry = Some((head, used_len));
        }
    }

    /// How many requests are in line, finished or not.
    pub(crate) fn len(&self) -> usize {
        self.line.len()
    }

    /// Moves the finished requests at the front of the line, those with nothing unfinished
    /// before them, to `used`.
    pub(crate) fn take_ready(&mut self, used: &mut Vec<(u16, u32)>) {
        while let Some(Some(done)) = self.line.front() {
            used.push(*done);
            self.line.pop_front();
            self.front += 1;
        }
    }

    /// Takes every request out of line: the queue stopped while they ran, and they finish
    /// without a used entry.
    pub(crate) fn forget(&mut self) {
        self.front += self.line.len() as u64;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_for_every_earlier_one_and_no_longer() {
        let mut order = UsedOrder::default();
        let (a, b, c) = (order.join(), order.join(), order.join());
        let mut used = Vec::new();
        order.finish(c, 7, 30);
        order.finish(b, 5, 20);
        order.take_ready(&mut used);
        assert!(used.is_empty(), "{used:?}");
        order.finish(a, 3, 10);
        order.take_ready(&mut used);
        assert_eq!(used, [(3, 10), (5, 20), (7, 30)]);
        assert_eq!(order.len(), 0);

        let d = order.join();
        order.finish(d, 9, 1);
        order.take_ready(&mut used);
        assert_eq!(used.last(), Some(&(9, 1)));
    }

    #[test]
    fn forgotten_requests_leave_the_line_and_their_finish_is_ignored() {
        let mut order = UsedOrder::default();
        let a = order.join();
        order.forget();
        let b = order.join();
        order.finish(a, 1, 1);
        let mut used = Vec::new();
        order.take_ready(&mut used);
        assert!(used.is_empty());
        order.finish(b, 2, 2);
        order.take_ready(&mut used);
        assert_eq!(used, [(2, 2)]);
    }
}
