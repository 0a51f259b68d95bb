//! Reading lineages: the list of (epoch, first revision, primary cluster)
//! that says who wrote which revisions of a cluster's history. Two
//! clusters whose lineages agree up to a revision hold the same history up
//! to it, since every region keeps the primary's revision numbers.

use meridian_proto::meridian::v1::LineageEntry;

/// The fence between two lineages: the revision after which they part (the
/// revision before the first epoch that `new` has and `old` does not, or
/// where they disagree). `None` when `new` adds nothing to `old`.
pub fn fence_between(old: &[LineageEntry], new: &[LineageEntry]) -> Option<i64> {
    let common = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let theirs = new.get(common)?;
    // Where the old one went its own way too, history parted at the earlier point.
    let ours = old.get(common).map_or(i64::MAX, |o| o.first_revision);
    Some(theirs.first_revision.min(ours) - 1)
}

/// Whether a secondary that followed cluster `followed` and holds revisions
/// up to `revision` may follow a source with `lineage` instead, without a
/// copy: the source's history contains `followed`'s up to the point where
/// a later primary took over, and the secondary holds nothing after that
/// point. (A secondary that got further has writes the new primary lost:
/// it must rejoin.)
pub fn continues(lineage: &[LineageEntry], followed: u64, revision: i64) -> bool {
    let Some(j) = lineage.iter().rposition(|l| l.primary_cluster_id == followed) else { return false };
    lineage.get(j + 1).is_some_and(|next| revision < next.first_revision)
}

/// Whether a secondary whose own lineage is `own` already holds the
/// history of `source` (cluster `source_cluster`, lineage `lineage`): its
/// newest epoch is that cluster's, and the source's lineage goes on from
/// it. (It got that history through another secondary that followed the
/// source, so its revisions are the source's.)
pub fn already_follows(own: &[LineageEntry], lineage: &[LineageEntry], source_cluster: u64) -> bool {
    own.last().is_some_and(|l| l.primary_cluster_id == source_cluster) && lineage.starts_with(own)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(epoch: u64, first: i64, cluster: u64) -> LineageEntry {
        LineageEntry { epoch, first_revision: first, primary_cluster_id: cluster, region: String::new() }
    }

    #[test]
    fn fences_between_lineages() {
        let base = vec![e(0, 1, 7)];
        // The new primary took over after revision 41.
        assert_eq!(fence_between(&base, &[e(0, 1, 7), e(1, 42, 9)]), Some(41));
        // Nothing new: nothing to rejoin.
        assert_eq!(fence_between(&base, &base), None);
        assert_eq!(fence_between(&[e(0, 1, 7), e(1, 42, 9)], &base), None);
        // Both went their own way: the earlier point.
        assert_eq!(fence_between(&[e(0, 1, 7), e(1, 30, 5)], &[e(0, 1, 7), e(1, 42, 9)]), Some(29));
        // Several epochs later.
        assert_eq!(fence_between(&base, &[e(0, 1, 7), e(1, 42, 9), e(2, 90, 7)]), Some(41));
    }

    #[test]
    fn a_secondary_that_already_holds_the_new_primarys_epoch_follows_it() {
        let new = [e(0, 1, 7), e(1, 42, 9)];
        assert!(already_follows(&new, &new, 9));
        assert!(already_follows(&new, &[e(0, 1, 7), e(1, 42, 9), e(2, 90, 9)], 9));
        assert!(!already_follows(&[e(0, 1, 7)], &new, 9), "its newest epoch is not the source's");
        assert!(!already_follows(&[e(0, 1, 7), e(1, 40, 9)], &new, 9), "a different epoch start");
        assert!(!already_follows(&[], &new, 9));
    }

    #[test]
    fn a_secondary_continues_on_the_primary_that_took_over() {
        let lineage = [e(0, 1, 7), e(1, 42, 9)];
        assert!(continues(&lineage, 7, 41), "holds exactly up to the fence");
        assert!(continues(&lineage, 7, 10));
        assert!(!continues(&lineage, 7, 42), "holds a revision the new primary wrote differently");
        assert!(!continues(&lineage, 9, 50), "9 is the current primary: not a takeover");
        assert!(!continues(&lineage, 5, 3), "never in this lineage");
        // 7 took over again after 9: a follower of 9 continues on 7 up to 89.
        let back = [e(0, 1, 7), e(1, 42, 9), e(2, 90, 7)];
        assert!(continues(&back, 9, 89));
        assert!(!continues(&back, 9, 90));
    }
}
