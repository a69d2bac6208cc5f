//! The per-writer duplicate filter of a run: which `(writer_id, sequence)`
//! keys were applied, which are being merged, and whether a new sequence
//! may be admitted under `--max-sequence-gaps-per-writer`.
//!
//! Owns the sequence bookkeeping only; it must not lock anything (the run
//! lock in [`super::run`] guards it) nor know about accumulators.
//!
//! # How it stays exact and bounded
//!
//! Per run and `writer_id`, a [`SeqSet`] of applied sequence numbers stored
//! exactly as disjoint inclusive intervals, so a writer numbering its
//! batches 0, 1, 2, … (from any start) costs one interval; each gap between
//! the numbers it sent costs one more. The filter never forgets: a batch
//! whose sequence was applied is a duplicate, any other batch is merged.
//! Memory is bounded instead by admission: a batch whose sequence is not
//! next to an applied one (it would open a new gap) is rejected, before
//! anything is claimed or merged, when the writer already has
//! `--max-sequence-gaps-per-writer` gaps. A sequence that extends an
//! interval or fills a remembered gap is always admitted, so a late batch
//! is either applied or refused with an error, never dropped silently.
//!
//! Claims of batches still being merged are kept separately (`in_flight`),
//! so a concurrent retry of the same batch is counted as a duplicate rather
//! than merged twice. Such a claim may still fail (its epoch closed
//! meanwhile) and be released, so admission counts the worst case: every
//! in-flight sequence that is not next to an applied one is counted as a
//! gap of its own. Because applied sets only grow while claims settle,
//! `intervals(applied) + isolated(in_flight)` never rises except through an
//! admission that checked it, and the applied set stays within the limit
//! whatever the outcome of the concurrent merges. A checkpoint restores the
//! intervals as they were, even beyond a since-lowered limit (then only
//! sequences next to applied ones are admitted until gaps are filled).
//!
//! The rejection is FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: no shared
//! resource is short and waiting does not help; what refuses the batch is
//! that writer's own history of sequence numbers, which only the client can
//! change (resend the missing sequences, send in increasing order, or use a
//! new `writer_id`). gRPC clients treat RESOURCE_EXHAUSTED as retryable with
//! back-off, which here would repeat the same refusal.

use std::collections::{BTreeMap, BTreeSet};

/// Applied sequence numbers of one writer, as disjoint, non-adjacent
/// inclusive intervals `start -> end`. Exact: it never forgets a number
/// (bounding it is [`WriterState::admit`]'s job).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SeqSet {
    ranges: BTreeMap<u64, u64>,
}

impl SeqSet {
    /// Whether `seq` was recorded.
    pub(crate) fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &end)| seq <= end)
    }

    /// Whether recording `seq` would add an interval: it is neither
    /// recorded nor next to a recorded number.
    pub(crate) fn is_isolated(&self, seq: u64) -> bool {
        !self.contains(seq)
            && seq.checked_sub(1).is_none_or(|prev| !self.contains(prev))
            && seq.checked_add(1).is_none_or(|next| !self.contains(next))
    }

    /// Records `seq`, joining adjacent intervals (adds at most one).
    pub(crate) fn insert(&mut self, seq: u64) {
        if self.contains(seq) {
            return;
        }
        let (mut start, mut end) = (seq, seq);
        if let Some((&prev_start, &prev_end)) = self.ranges.range(..seq).next_back() {
            if prev_end.checked_add(1) == Some(seq) {
                start = prev_start;
            }
        }
        if let Some(next) = seq.checked_add(1) {
            if let Some(next_end) = self.ranges.remove(&next) {
                end = next_end;
            }
        }
        self.ranges.insert(start, end);
    }

    /// Records every number of `other`.
    pub(crate) fn union(&mut self, other: &SeqSet) {
        if other.ranges.is_empty() {
            return;
        }
        let mut flat = self.to_flat();
        flat.extend(other.to_flat());
        *self = SeqSet::from_flat(&flat);
    }

    /// The largest recorded number.
    pub(crate) fn max(&self) -> Option<u64> {
        self.ranges.values().next_back().copied()
    }

    /// The smallest number recorded here but not in `other`.
    pub(crate) fn first_missing_from(&self, other: &SeqSet) -> Option<u64> {
        for (&start, &end) in &self.ranges {
            let mut x = start;
            loop {
                match other.ranges.range(..=x).next_back() {
                    Some((_, &covered)) if covered >= x => {
                        if covered >= end {
                            break;
                        }
                        x = covered + 1;
                    }
                    _ => return Some(x),
                }
            }
        }
        None
    }

    /// Durable acknowledgement of a writer whose applied numbers are `self`
    /// and durable numbers `durable`: the largest `n` such that every
    /// applied number `<= n` is durable (`None`: nothing applied is).
    pub(crate) fn durable_through(&self, durable: &SeqSet) -> Option<u64> {
        match self.first_missing_from(durable) {
            Some(first) => first.checked_sub(1),
            None => self.max(),
        }
    }

    /// Number of intervals held.
    pub(crate) fn intervals(&self) -> usize {
        self.ranges.len()
    }

    /// `[start0, end0, start1, end1, …]` for a checkpoint.
    pub(crate) fn to_flat(&self) -> Vec<u64> {
        self.ranges.iter().flat_map(|(&s, &e)| [s, e]).collect()
    }

    /// Rebuilds from [`SeqSet::to_flat`] output. Reversed pairs are skipped
    /// and overlapping or adjacent ones joined, so the gap count stays
    /// exact even for a hand-edited checkpoint; nothing is dropped for
    /// exceeding the limit (admission handles that).
    pub(crate) fn from_flat(flat: &[u64]) -> SeqSet {
        let mut pairs: Vec<(u64, u64)> = flat
            .chunks_exact(2)
            .map(|pair| (pair[0], pair[1]))
            .filter(|(start, end)| start <= end)
            .collect();
        pairs.sort_unstable();
        let mut set = SeqSet::default();
        let mut current: Option<(u64, u64)> = None;
        for (start, end) in pairs {
            current = match current {
                Some((s, e)) if start <= e.saturating_add(1) => Some((s, e.max(end))),
                Some((s, e)) => {
                    set.ranges.insert(s, e);
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some((s, e)) = current {
            set.ranges.insert(s, e);
        }
        set
    }
}

/// The filter of one writer: its applied sequences and the claims of
/// batches being merged.
#[derive(Debug, Default)]
pub(crate) struct WriterState {
    applied: SeqSet,
    /// Claimed, being merged; disjoint from `applied`.
    in_flight: BTreeSet<u64>,
}

impl WriterState {
    /// Adds sequences restored from durable state (no claims are open).
    pub(crate) fn restore(&mut self, applied: &SeqSet) {
        self.applied.union(applied);
    }

    /// The applied sequences (for the checkpoint).
    pub(crate) fn applied(&self) -> &SeqSet {
        &self.applied
    }

    /// Whether `seq` was applied or is being merged.
    pub(crate) fn is_duplicate(&self, seq: u64) -> bool {
        self.applied.contains(seq) || self.in_flight.contains(&seq)
    }

    /// Claims an admitted `seq` for the merge in progress.
    pub(crate) fn claim(&mut self, seq: u64) {
        self.in_flight.insert(seq);
    }

    /// Ends the claim of `seq`: recorded as applied when its merge
    /// succeeded, released otherwise.
    pub(crate) fn settle(&mut self, seq: u64, merged: bool) {
        self.in_flight.remove(&seq);
        if merged {
            self.applied.insert(seq);
        }
    }

    /// Admission of `seq` against `max_gaps` (see the module doc). `Err`
    /// carries the gaps the writer has in the worst case before `seq`:
    /// applied intervals plus isolated in-flight claims, − 1.
    pub(crate) fn admit(&self, seq: u64, max_gaps: u64) -> Result<(), u64> {
        if !self.applied.is_isolated(seq) {
            // Extends an interval or fills a gap: never adds one.
            return Ok(());
        }
        let pending = self
            .in_flight
            .iter()
            .filter(|&&claimed| self.applied.is_isolated(claimed))
            .count();
        let worst_intervals = (self.applied.intervals() + pending) as u64;
        // With `seq`, the worst case has `worst_intervals + 1` intervals,
        // i.e. `worst_intervals` gaps.
        if worst_intervals > max_gaps {
            Err(worst_intervals.saturating_sub(1))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqset_is_exact_and_never_forgets() {
        let mut s = SeqSet::default();
        assert_eq!(s.intervals(), 0);
        for seq in [5, 7, 6, 1, 2, 3] {
            s.insert(seq);
        }
        assert_eq!(s.to_flat(), vec![1, 3, 5, 7]);
        assert_eq!(s.intervals(), 2);
        assert!(s.contains(2) && s.contains(6) && !s.contains(4) && !s.contains(0));
        // 4 and 0 border an interval; 9 and 10 do not; 6 is recorded.
        assert!(!s.is_isolated(4) && !s.is_isolated(0) && !s.is_isolated(8));
        assert!(s.is_isolated(10) && s.is_isolated(u64::MAX) && !s.is_isolated(6));
        s.insert(4);
        assert_eq!(s.to_flat(), vec![1, 7]);
        s.insert(u64::MAX);
        assert!(s.contains(u64::MAX) && !s.is_isolated(u64::MAX - 1));
        assert_eq!(SeqSet::from_flat(&s.to_flat()), s);

        // Far beyond the default limit every number is still remembered
        // exactly: bounding is admission's job, not forgetting.
        let n = 3000u64;
        let mut sparse = SeqSet::default();
        for i in 0..n {
            sparse.insert(i * 2);
        }
        assert_eq!(sparse.intervals(), n as usize);
        assert!(sparse.contains(0) && !sparse.contains(1) && sparse.contains(2 * (n - 1)));
        assert_eq!(SeqSet::from_flat(&sparse.to_flat()), sparse);
    }

    #[test]
    fn durable_through_is_the_end_of_the_durable_prefix() {
        let applied = SeqSet::from_flat(&[1, 10, 20, 25]);
        let mut durable = SeqSet::from_flat(&[1, 4]);
        assert_eq!(applied.first_missing_from(&durable), Some(5));
        assert_eq!(applied.durable_through(&durable), Some(4));
        durable.union(&SeqSet::from_flat(&[5, 10, 12, 13]));
        assert_eq!(durable.to_flat(), vec![1, 10, 12, 13]);
        assert_eq!(applied.durable_through(&durable), Some(19));
        durable.union(&SeqSet::from_flat(&[20, 25]));
        assert_eq!(applied.durable_through(&durable), Some(25));
        assert_eq!(
            SeqSet::from_flat(&[0, 3]).durable_through(&SeqSet::default()),
            None
        );
        assert_eq!(SeqSet::default().durable_through(&durable), None);
    }

    #[test]
    fn seqset_from_flat_normalises() {
        // Overlapping, adjacent, unsorted and reversed pairs.
        let s = SeqSet::from_flat(&[10, 12, 1, 3, 4, 5, 11, 20, 9, 2, 30, 30, 7]);
        assert_eq!(s.to_flat(), vec![1, 5, 10, 20, 30, 30]);
        assert_eq!(s.intervals(), 3);
        assert_eq!(SeqSet::from_flat(&[]), SeqSet::default());
    }

    #[test]
    fn admission_counts_in_flight_claims_at_their_worst() {
        let mut w = WriterState::default();
        w.applied.insert(0);
        w.claim(5);
        // {0} plus a pending 5 is one gap; 10 would make two.
        assert_eq!(w.admit(10, 1), Err(1));
        assert_eq!(w.admit(10, 2), Ok(()));
        // Next to an applied number: never a new gap, even at the limit.
        assert_eq!(w.admit(1, 0), Ok(()));

        // A pending claim that would bridge {0} and {2} may still fail, so
        // it does not make room: 4 is refused until 1 has landed.
        let mut w = WriterState::default();
        w.applied.insert(0);
        w.applied.insert(2);
        w.claim(1);
        assert_eq!(w.admit(4, 1), Err(1));
        w.settle(1, true);
        assert_eq!(w.admit(4, 1), Ok(()));
    }
}
