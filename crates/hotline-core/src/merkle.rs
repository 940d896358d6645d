//! An append-only RFC 6962 Merkle tree over envelope ids, kept as its complete subtrees.
//!
//! Every subtree whose leaves are all present (`2^level` leaves starting at a multiple of
//! `2^level`) is final once its last leaf arrives, so it is stored once, under
//! `(level, index)`, and never rewritten. Any tree hash `MTH(D[a:b])` that RFC 6962 needs
//! is built from O(log n) of them:
//!
//! ```text
//!   level 2                 [0..4)
//!   level 1         [0..2)          [2..4)        [4..6)
//!   level 0      id0     id1     id2     id3    id4    id5    id6
//!                                                              └ not yet paired
//!   root(7) = H(0x01 ‖ [0..4) ‖ H(0x01 ‖ [4..6) ‖ id6-leaf))
//! ```
//!
//! So appending a leaf writes at most `log2 n` nodes, the root over any prefix costs
//! O(log n) reads, and a consistency proof between two prefixes (RFC 6962 §2.1.2) costs
//! O(log² n) reads, whatever the history. The node storage is a trait ([`MerkleNodes`]),
//! so the device keeps the nodes in its database and the simulations in memory. Proofs
//! come out as `ct_merkle` types and are verified by `ct_merkle`, the maintained
//! implementation; the tests check every root against `ct_merkle`'s own tree.

use ct_merkle::{ConsistencyProof, RootHash};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Leaf and node hashes are SHA-256 digests.
pub type Hash = [u8; 32];

/// Where the complete subtrees live failed to answer.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("transcript storage failed: {0}")]
pub struct StorageError(pub String);

/// Storage of complete subtree hashes, by `(level, index)`.
pub trait MerkleNodes: std::fmt::Debug {
    /// The hash of the complete subtree `index` at `level`, if stored.
    fn node(&self, level: u32, index: u64) -> Result<Option<Hash>, StorageError>;
    /// Stores a complete subtree's hash. It never changes once stored.
    fn put_node(&mut self, level: u32, index: u64, hash: Hash) -> Result<(), StorageError>;
}

/// Complete subtrees in memory: one vector per level.
#[derive(Clone, Debug, Default)]
pub struct MemoryNodes {
    levels: Vec<Vec<Hash>>,
}

impl MerkleNodes for MemoryNodes {
    fn node(&self, level: u32, index: u64) -> Result<Option<Hash>, StorageError> {
        Ok(self
            .levels
            .get(level as usize)
            .and_then(|nodes| nodes.get(usize::try_from(index).ok()?))
            .copied())
    }

    fn put_node(&mut self, level: u32, index: u64, hash: Hash) -> Result<(), StorageError> {
        let level = level as usize;
        if self.levels.len() <= level {
            self.levels.resize_with(level + 1, Vec::new);
        }
        let nodes = &mut self.levels[level];
        match usize::try_from(index) {
            Ok(index) if index == nodes.len() => nodes.push(hash),
            Ok(index) if index < nodes.len() => nodes[index] = hash,
            _ => {
                return Err(StorageError(format!(
                    "merkle node {index} at level {level} written out of order"
                )));
            }
        }
        Ok(())
    }
}

/// RFC 6962 leaf hash: `SHA-256(0x00 ‖ leaf)`.
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(leaf);
    hasher.finalize().into()
}

/// RFC 6962 interior node hash: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The RFC 6962 hash of the empty tree: `SHA-256()`.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Why a consistency proof could not be made.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ProofError {
    #[error("a consistency proof needs a non-empty older tree no larger than the newer one")]
    BadSizes,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// An append-only Merkle log of `len` leaves over node storage `N`.
#[derive(Clone, Debug)]
pub struct MerkleLog<N> {
    nodes: N,
    len: u64,
    /// The right edge: the complete subtrees that `[0, len)` is made of, largest first
    /// (`(start, size, hash)`), kept in memory so that roots read nothing; `None` until
    /// [`MerkleLog::load_frontier`] (then the nodes are read).
    frontier: Option<Vec<(u64, u64, Hash)>>,
}

impl<N: MerkleNodes + Default> Default for MerkleLog<N> {
    fn default() -> Self {
        Self::open(N::default(), 0)
    }
}

impl<N: MerkleNodes> MerkleLog<N> {
    /// A log over `nodes` that already hold the complete subtrees of `len` leaves.
    pub fn open(nodes: N, len: u64) -> Self {
        let frontier = (len == 0).then(Vec::new);
        Self {
            nodes,
            len,
            frontier,
        }
    }

    /// Reads the right edge's O(log n) complete subtrees, so that roots of the whole
    /// log read nothing more.
    pub fn load_frontier(&mut self) -> Result<(), StorageError> {
        let mut frontier = Vec::new();
        let mut start = 0;
        for level in (0..64).rev() {
            let size = 1u64 << level;
            if self.len - start >= size {
                let hash = self.stored(level, start / size)?;
                frontier.push((start, size, hash));
                start += size;
            }
        }
        self.frontier = Some(frontier);
        Ok(())
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn nodes(&self) -> &N {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut N {
        &mut self.nodes
    }

    /// Appends one leaf; writes the leaf and every subtree it completes.
    pub fn push(&mut self, leaf: &[u8]) -> Result<(), StorageError> {
        let mut hash = leaf_hash(leaf);
        let mut index = self.len;
        let mut level = 0;
        self.nodes.put_node(level, index, hash)?;
        if let Some(frontier) = &mut self.frontier {
            frontier.push((self.len, 1, hash));
        }
        while index % 2 == 1 {
            let left = match self
                .frontier
                .as_ref()
                .and_then(|f| f.len().checked_sub(2).map(|i| f[i]))
            {
                Some((_, size, left)) if size == 1 << level => left,
                _ => self.stored(level, index - 1)?,
            };
            hash = node_hash(&left, &hash);
            index /= 2;
            level += 1;
            self.nodes.put_node(level, index, hash)?;
            if let Some(frontier) = &mut self.frontier {
                let merged = frontier.len() >= 2;
                if merged {
                    frontier.pop();
                    if let Some(last) = frontier.last_mut() {
                        *last = (last.0, last.1 * 2, hash);
                    }
                }
            }
        }
        self.len += 1;
        Ok(())
    }

    /// The root over the first `size` leaves (`size` ≤ [`Self::len`]), as
    /// `(hash, size)`.
    pub fn root_at(&self, size: u64) -> Result<(Hash, u64), StorageError> {
        if size > self.len {
            return Err(StorageError(format!(
                "root of {size} leaves asked of a log of {}",
                self.len
            )));
        }
        if size == 0 {
            return Ok((empty_root(), 0));
        }
        Ok((self.range(0, size)?, size))
    }

    /// The root over all leaves.
    pub fn root(&self) -> Result<(Hash, u64), StorageError> {
        self.root_at(self.len)
    }

    /// The root over the first `prefix` stored leaves followed by `tail` (leaves not
    /// stored), in O(log n + tail): what the root of that sequence would be.
    pub fn root_with(&self, prefix: u64, tail: &[Hash]) -> Result<(Hash, u64), StorageError> {
        if prefix > self.len {
            return Err(StorageError(format!(
                "root over {prefix} stored leaves asked of a log of {}",
                self.len
            )));
        }
        let total = prefix + tail.len() as u64;
        if total == 0 {
            return Ok((empty_root(), 0));
        }
        let leaf = |index: u64| -> Result<Hash, StorageError> {
            if index < prefix {
                self.stored(0, index)
            } else {
                Ok(leaf_hash(&tail[(index - prefix) as usize]))
            }
        };
        let hash = self.mixed_range(0, total, prefix, &leaf)?;
        Ok((hash, total))
    }

    /// `MTH(D[start:end])` where leaves from `prefix` on are not stored.
    fn mixed_range(
        &self,
        start: u64,
        end: u64,
        prefix: u64,
        leaf: &dyn Fn(u64) -> Result<Hash, StorageError>,
    ) -> Result<Hash, StorageError> {
        if end <= prefix {
            return self.range(start, end);
        }
        let count = end - start;
        if count == 1 {
            return leaf(start);
        }
        let split = largest_power_of_two_below(count);
        let left = self.mixed_range(start, start + split, prefix, leaf)?;
        let right = self.mixed_range(start + split, end, prefix, leaf)?;
        Ok(node_hash(&left, &right))
    }

    /// A consistency proof that the tree of `old` leaves is a prefix of the tree of
    /// `new` leaves (RFC 6962 §2.1.2), for `ct_merkle` to verify.
    pub fn consistency_proof(
        &self,
        old: u64,
        new: u64,
    ) -> Result<ConsistencyProof<Sha256>, ProofError> {
        if old == 0 || old > new || new > self.len {
            return Err(ProofError::BadSizes);
        }
        let mut path = Vec::new();
        self.subproof(old, 0, new, true, &mut path)?;
        let digests: Vec<_> = path.iter().map(|hash| (*hash).into()).collect();
        Ok(ConsistencyProof::from_digests(digests.iter()))
    }

    /// RFC 6962's SUBPROOF(m, D[start:end], complete).
    fn subproof(
        &self,
        m: u64,
        start: u64,
        end: u64,
        complete: bool,
        path: &mut Vec<Hash>,
    ) -> Result<(), StorageError> {
        let n = end - start;
        if m == n {
            if !complete {
                path.push(self.range(start, end)?);
            }
            return Ok(());
        }
        let k = largest_power_of_two_below(n);
        if m <= k {
            self.subproof(m, start, start + k, complete, path)?;
            path.push(self.range(start + k, end)?);
        } else {
            self.subproof(m - k, start + k, end, false, path)?;
            path.push(self.range(start, start + k)?);
        }
        Ok(())
    }

    /// `MTH(D[start:end])` over stored leaves, from complete subtrees (the right edge's
    /// from memory).
    fn range(&self, start: u64, end: u64) -> Result<Hash, StorageError> {
        let count = end - start;
        if let Some(frontier) = &self.frontier
            && let Some((_, _, hash)) = frontier
                .iter()
                .find(|(first, size, _)| *first == start && *size == count)
        {
            return Ok(*hash);
        }
        if count.is_power_of_two() && start.is_multiple_of(count) {
            return self.stored(count.trailing_zeros(), start / count);
        }
        let split = largest_power_of_two_below(count);
        let left = self.range(start, start + split)?;
        let right = self.range(start + split, end)?;
        Ok(node_hash(&left, &right))
    }

    fn stored(&self, level: u32, index: u64) -> Result<Hash, StorageError> {
        self.nodes.node(level, index)?.ok_or_else(|| {
            StorageError(format!(
                "merkle node {index} at level {level} is missing ({} leaves)",
                self.len
            ))
        })
    }
}

/// A `ct_merkle` root, for verifying proofs.
pub fn ct_root((hash, size): (Hash, u64)) -> RootHash<Sha256> {
    RootHash::new(hash.into(), size)
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn largest_power_of_two_below(n: u64) -> u64 {
    1 << (63 - (n - 1).leading_zeros())
}

/// The right edge of an RFC 6962 tree built leaf by leaf: its complete subtrees,
/// largest first. Memory O(log n); the root of the leaves so far at any time. Used
/// where only the newest root is needed and no node is kept (roots of a horizon's
/// envelopes, see [`crate::cosign`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    len: u64,
    /// (subtree size, subtree hash), sizes strictly decreasing powers of two.
    edge: Vec<(u64, Hash)>,
}

impl Frontier {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one leaf.
    pub fn push(&mut self, leaf: &[u8]) {
        let mut node = (1u64, leaf_hash(leaf));
        while let Some(&(size, hash)) = self.edge.last() {
            if size != node.0 {
                break;
            }
            self.edge.pop();
            node = (size * 2, node_hash(&hash, &node.1));
        }
        self.edge.push(node);
        self.len += 1;
    }

    /// `MTH` of the leaves pushed so far: the edge's subtrees folded from the right.
    pub fn root(&self) -> Hash {
        let mut subtrees = self.edge.iter().rev();
        let Some((_, last)) = subtrees.next() else {
            return empty_root();
        };
        subtrees.fold(*last, |acc, (_, hash)| node_hash(hash, &acc))
    }

    /// `u64 len | u8 n, n × (u64 size, [32] hash)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + 40 * self.edge.len());
        out.extend_from_slice(&self.len.to_be_bytes());
        out.push(self.edge.len() as u8);
        for (size, hash) in &self.edge {
            out.extend_from_slice(&size.to_be_bytes());
            out.extend_from_slice(hash);
        }
        out
    }

    /// The frontier [`Frontier::encode`] wrote; `None` if the bytes are not one
    /// (sizes must be the binary digits of `len`, largest first).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let len = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let count = *bytes.get(8)? as usize;
        let rest = bytes.get(9..)?;
        if rest.len() != count * 40 {
            return None;
        }
        let edge: Vec<(u64, Hash)> = rest
            .chunks_exact(40)
            .map(|chunk| {
                let size = u64::from_be_bytes(chunk[..8].try_into().unwrap_or_default());
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&chunk[8..]);
                (size, hash)
            })
            .collect();
        let canonical = edge.windows(2).all(|pair| pair[0].0 > pair[1].0)
            && edge.iter().all(|(size, _)| size.is_power_of_two())
            && edge.iter().map(|(size, _)| size).sum::<u64>() == len;
        canonical.then_some(Self { len, edge })
    }
}

#[cfg(test)]
mod tests {
    use ct_merkle::mem_backed_tree::MemoryBackedTree;

    use super::*;

    fn leaf(i: u64) -> [u8; 32] {
        Sha256::digest(i.to_be_bytes()).into()
    }

    fn reference_root(leaves: u64) -> Hash {
        let mut tree = MemoryBackedTree::<Sha256, [u8; 32]>::new();
        for i in 0..leaves {
            tree.push(leaf(i));
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(tree.root().as_bytes());
        out
    }

    #[test]
    fn roots_match_ct_merkle_at_every_size() {
        let mut log = MerkleLog::<MemoryNodes>::default();
        assert_eq!(log.root().unwrap(), (reference_root(0), 0));
        for i in 0..70 {
            log.push(&leaf(i)).unwrap();
            assert_eq!(
                log.root().unwrap(),
                (reference_root(i + 1), i + 1),
                "size {}",
                i + 1
            );
        }
        for size in 0..=70 {
            assert_eq!(log.root_at(size).unwrap().0, reference_root(size));
        }
    }

    #[test]
    fn a_root_with_a_tail_is_the_root_after_pushing_it() {
        for stored in 0..20 {
            for tail in 0..20 {
                let mut log = MerkleLog::<MemoryNodes>::default();
                for i in 0..stored {
                    log.push(&leaf(i)).unwrap();
                }
                let tail: Vec<_> = (stored..stored + tail).map(leaf).collect();
                assert_eq!(
                    log.root_with(stored, &tail).unwrap(),
                    (
                        reference_root(stored + tail.len() as u64),
                        stored + tail.len() as u64
                    )
                );
                // A shorter stored prefix, then the rest as a tail, gives the same root.
                let cut = stored / 2;
                let rest: Vec<_> = (cut..stored + tail.len() as u64).map(leaf).collect();
                assert_eq!(
                    log.root_with(cut, &rest).unwrap(),
                    log.root_with(stored, &tail).unwrap()
                );
            }
        }
    }

    #[test]
    fn consistency_proofs_verify_with_ct_merkle_and_fail_for_other_roots() {
        let mut log = MerkleLog::<MemoryNodes>::default();
        for i in 0..40 {
            log.push(&leaf(i)).unwrap();
        }
        for old in 1..=40 {
            for new in old..=40 {
                let proof = log.consistency_proof(old, new).unwrap();
                let old_root = ct_root(log.root_at(old).unwrap());
                let new_root = ct_root(log.root_at(new).unwrap());
                new_root
                    .verify_consistency(&old_root, &proof)
                    .unwrap_or_else(|e| panic!("{old} -> {new}: {e:?}"));
                if old > 1 && old < new {
                    // A root over other leaves does not verify against the same proof.
                    let other = ct_root(log.root_at(old - 1).map(|(h, _)| (h, old)).unwrap());
                    assert!(new_root.verify_consistency(&other, &proof).is_err());
                }
            }
        }
        assert_eq!(
            log.consistency_proof(0, 3).unwrap_err(),
            ProofError::BadSizes
        );
        assert_eq!(
            log.consistency_proof(5, 4).unwrap_err(),
            ProofError::BadSizes
        );
        assert_eq!(
            log.consistency_proof(5, 41).unwrap_err(),
            ProofError::BadSizes
        );
    }

    #[test]
    fn a_reopened_log_gives_the_same_roots_with_or_without_its_right_edge_in_memory() {
        let mut log = MerkleLog::<MemoryNodes>::default();
        for i in 0..37 {
            log.push(&leaf(i)).unwrap();
        }
        let mut loaded = MerkleLog::open(log.nodes().clone(), 37);
        loaded.load_frontier().unwrap();
        let mut cold = MerkleLog::open(log.nodes().clone(), 37);
        for i in 37..80 {
            loaded.push(&leaf(i)).unwrap();
            cold.push(&leaf(i)).unwrap();
            let expected = (reference_root(i + 1), i + 1);
            assert_eq!(loaded.root().unwrap(), expected);
            assert_eq!(cold.root().unwrap(), expected);
            let tail = [leaf(1000), leaf(1001), leaf(1002)];
            assert_eq!(
                loaded.root_with(i + 1, &tail).unwrap(),
                cold.root_with(i + 1, &tail).unwrap()
            );
        }
        assert_eq!(loaded.root_at(50).unwrap().0, reference_root(50));
    }

    #[test]
    fn missing_nodes_are_an_error_not_a_panic() {
        let log = MerkleLog::open(MemoryNodes::default(), 5);
        assert!(log.root().is_err());
        assert!(log.consistency_proof(2, 5).is_err());
    }

    #[test]
    fn a_frontier_gives_the_logs_root_at_every_size_and_round_trips() {
        let mut log = MerkleLog::<MemoryNodes>::default();
        let mut frontier = Frontier::default();
        assert_eq!(frontier.root(), empty_root());
        for index in 0u32..300 {
            let leaf = index.to_be_bytes();
            log.push(&leaf).unwrap();
            frontier.push(&leaf);
            assert_eq!(frontier.root(), log.root().unwrap().0, "at {}", index + 1);
            assert_eq!(Frontier::decode(&frontier.encode()), Some(frontier.clone()));
        }
        let mut bad = frontier.encode();
        bad[7] ^= 1;
        assert_eq!(Frontier::decode(&bad), None);
        assert_eq!(Frontier::decode(&bad[..5]), None);
    }
}
