//! The subset of bbolt's file format that etcd's snapshots need: a reader
//! for any file bbolt wrote, and a writer that lays out fresh, dense files
//! that bbolt (and so etcd and etcdctl) opens, checks and writes to.
//!
//! # The file
//!
//! The file is an array of fixed-size pages (the page size is in the meta
//! page; this writer uses 4096). Every page starts with a 16-byte header,
//! all integers little-endian:
//!
//! ```text
//!   id: u64   flags: u16   count: u16   overflow: u32
//!   flags: 0x01 branch, 0x02 leaf, 0x04 meta, 0x10 freelist
//! ```
//!
//! A page whose contents do not fit takes `overflow` more pages after it.
//!
//! ```text
//!   page 0, 1  meta: magic 0xED0CDAED, version 2, page size, flags,
//!              root bucket {root page, sequence}, freelist page,
//!              page count (the high-water mark), txid,
//!              checksum (FNV-1a 64 of the 56 bytes before it)
//!              bbolt uses the valid meta with the higher txid.
//!   freelist   count u64 page ids (if count is 0xFFFF, the first u64 is
//!              the real count).
//!   branch     count elements {pos: u32, ksize: u32, page: u64}, then keys;
//!              pos is from the element's own start. Each key is the first
//!              key under that child.
//!   leaf       count elements {flags: u32, pos: u32, ksize: u32, vsize: u32},
//!              then each key followed by its value. flags 0x01 marks a
//!              nested bucket, whose value is {root page: u64, sequence: u64},
//!              and when root is 0 an inline leaf page follows in the value.
//! ```
//!
//! The root bucket is a B+tree whose leaves name the top-level buckets
//! (etcd's `key`, `meta`, `lease`, ...). Keys sort bytewise everywhere.
//!
//! # What the writer makes
//!
//! Pages 0 and 1 are metas (txid 0 and 1, as bbolt makes a new file), page
//! 2 an empty freelist, then every bucket's tree in name order, leaves
//! packed full and written as their keys arrive, branches above them, and
//! last the root bucket's tree. Every page below the high-water mark is in
//! use, so bbolt's consistency check finds nothing unreachable. Only the
//! branch entries (one per leaf page) are held in memory.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
pub const PAGE_SIZE: usize = 4096;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
const BUCKET_FLAG: u32 = 0x01;
/// Offset of the checksum within the meta; the checksum covers what precedes it.
const META_SUM_AT: usize = 56;
/// Deeper trees than this are corrupt (a 4 KiB page holds ≥ 100 children).
const MAX_DEPTH: usize = 32;

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("bbolt file: {what}"))
}

fn u16_at(b: &[u8], at: usize) -> Result<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes(s.try_into().expect("2 bytes"))).ok_or_else(|| corrupt("short page"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes"))).ok_or_else(|| corrupt("short page"))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes"))).ok_or_else(|| corrupt("short page"))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// The parts of a meta page the reader uses.
#[derive(Clone, Copy, Debug)]
struct Meta {
    page_size: u64,
    root: u64,
    pages: u64,
    txid: u64,
}

fn parse_meta(page: &[u8]) -> Result<Meta> {
    let m = page.get(HEADER..HEADER + 64).ok_or_else(|| corrupt("short meta page"))?;
    if u32_at(m, 0)? != MAGIC {
        return Err(corrupt("not a bbolt file (bad magic)"));
    }
    if u32_at(m, 4)? != VERSION {
        return Err(corrupt(format!("unsupported version {}", u32_at(m, 4)?)));
    }
    if u64_at(m, META_SUM_AT)? != fnv1a(&m[..META_SUM_AT]) {
        return Err(corrupt("meta checksum mismatch"));
    }
    let page_size = u64::from(u32_at(m, 8)?);
    if !(512..=1 << 20).contains(&page_size) {
        return Err(corrupt(format!("page size {page_size}")));
    }
    Ok(Meta { page_size, root: u64_at(m, 16)?, pages: u64_at(m, 40)?, txid: u64_at(m, 48)? })
}

/// A read-only view of a bbolt file. Pages are read as they are visited,
/// so a file of any size is read in bounded memory.
pub struct Reader {
    file: File,
    meta: Meta,
}

/// Where a bucket's tree lives.
enum Root {
    Page(u64),
    /// An inline bucket: its one leaf page, held in the parent's value.
    Inline(Vec<u8>),
}

impl Reader {
    /// Opens `path`, using the newest valid meta page.
    ///
    /// # Errors
    ///
    /// IO errors, or [`Error::Corrupt`] when neither meta page is valid.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path)?;
        let mut first = vec![0u8; HEADER + 64];
        file.read_exact_at(&mut first, 0)?;
        // Page 1 is at the page size page 0 names (if page 0 is damaged, try 4 KiB).
        let m0 = parse_meta(&first);
        let size = m0.as_ref().map_or(PAGE_SIZE as u64, |m| m.page_size);
        let mut second = vec![0u8; HEADER + 64];
        let m1 = file.read_exact_at(&mut second, size).map_err(Error::from).and_then(|()| parse_meta(&second));
        let meta = match (m0, m1) {
            (Ok(a), Ok(b)) => {
                if b.txid > a.txid {
                    b
                } else {
                    a
                }
            }
            (Ok(m), Err(_)) | (Err(_), Ok(m)) => m,
            (Err(e), Err(_)) => return Err(e),
        };
        Ok(Self { file, meta })
    }

    /// The file's transaction id (of the meta page in use).
    pub fn txid(&self) -> u64 {
        self.meta.txid
    }

    fn page(&self, id: u64) -> Result<Vec<u8>> {
        if id < 2 || id >= self.meta.pages {
            return Err(corrupt(format!("page {id} is outside the file's {} pages", self.meta.pages)));
        }
        let ps = self.meta.page_size;
        let mut head = vec![0u8; HEADER];
        self.file.read_exact_at(&mut head, id * ps)?;
        let overflow = u64::from(u32_at(&head, 12)?);
        if id + overflow >= self.meta.pages {
            return Err(corrupt(format!("page {id} overflows the file")));
        }
        let mut page = vec![0u8; ((overflow + 1) * ps) as usize];
        self.file.read_exact_at(&mut page, id * ps)?;
        Ok(page)
    }

    /// The names of the top-level buckets, in order.
    ///
    /// # Errors
    ///
    /// IO errors, or [`Error::Corrupt`].
    pub fn buckets(&self) -> Result<Vec<Vec<u8>>> {
        let mut names = Vec::new();
        self.walk(&Root::Page(self.meta.root), &mut |flags, k, _| {
            if flags & BUCKET_FLAG != 0 {
                names.push(k.to_vec());
            }
            Ok(())
        })?;
        Ok(names)
    }

    /// Hands every key and value of the top-level bucket `name` to `each`, in
    /// key order (nested buckets are skipped: etcd has none). False when
    /// there is no such bucket.
    ///
    /// # Errors
    ///
    /// IO errors, [`Error::Corrupt`], or what `each` returns.
    pub fn for_each(&self, name: &[u8], mut each: impl FnMut(&[u8], &[u8]) -> Result<()>) -> Result<bool> {
        let mut found = None;
        self.walk(&Root::Page(self.meta.root), &mut |flags, k, v| {
            if flags & BUCKET_FLAG != 0 && k == name {
                let root = u64_at(v, 0)?;
                found = Some(if root == 0 {
                    Root::Inline(v.get(16..).ok_or_else(|| corrupt("short inline bucket"))?.to_vec())
                } else {
                    Root::Page(root)
                });
            }
            Ok(())
        })?;
        let Some(root) = found else { return Ok(false) };
        self.walk(&root, &mut |flags, k, v| if flags & BUCKET_FLAG == 0 { each(k, v) } else { Ok(()) })?;
        Ok(true)
    }

    fn walk(&self, root: &Root, each: &mut dyn FnMut(u32, &[u8], &[u8]) -> Result<()>) -> Result<()> {
        match root {
            Root::Inline(page) => leaf_elements(page, each),
            Root::Page(id) => self.walk_page(*id, 0, &mut HashSet::new(), each),
        }
    }

    fn walk_page(
        &self,
        id: u64,
        depth: usize,
        seen: &mut HashSet<u64>,
        each: &mut dyn FnMut(u32, &[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        if depth > MAX_DEPTH || !seen.insert(id) {
            return Err(corrupt(format!("page {id} is reached twice or too deep")));
        }
        let page = self.page(id)?;
        match u16_at(&page, 8)? {
            LEAF => leaf_elements(&page, each),
            BRANCH => {
                let count = usize::from(u16_at(&page, 10)?);
                for i in 0..count {
                    let child = u64_at(&page, HEADER + i * ELEMENT + 8)?;
                    self.walk_page(child, depth + 1, seen, each)?;
                }
                Ok(())
            }
            flags => Err(corrupt(format!("page {id} has flags {flags:#x} inside a tree"))),
        }
    }
}

fn leaf_elements(page: &[u8], each: &mut dyn FnMut(u32, &[u8], &[u8]) -> Result<()>) -> Result<()> {
    if u16_at(page, 8)? != LEAF {
        return Err(corrupt("an inline bucket that is not a leaf"));
    }
    let count = usize::from(u16_at(page, 10)?);
    for i in 0..count {
        let at = HEADER + i * ELEMENT;
        let flags = u32_at(page, at)?;
        let start = at + u32_at(page, at + 4)? as usize;
        let (ksize, vsize) = (u32_at(page, at + 8)? as usize, u32_at(page, at + 12)? as usize);
        let key = page.get(start..start + ksize).ok_or_else(|| corrupt("a key past its page"))?;
        let value = page.get(start + ksize..start + ksize + vsize).ok_or_else(|| corrupt("a value past its page"))?;
        each(flags, key, value)?;
    }
    Ok(())
}

/// One level of a tree being built: the page filling up, and the
/// (first key, page) of every page this level has written.
#[derive(Default)]
struct Level {
    elements: Vec<(u32, Vec<u8>, Vec<u8>)>,
    bytes: usize,
    written: Vec<(Vec<u8>, u64)>,
}

/// Writes a new bbolt file, bucket by bucket, keys in order.
pub struct Writer {
    file: File,
    next_page: u64,
    /// The bucket being filled: its name and leaf level.
    bucket: Option<(Vec<u8>, Level)>,
    /// Finished buckets and their root pages.
    buckets: Vec<(Vec<u8>, u64)>,
    last_key: Option<Vec<u8>>,
}

impl Writer {
    /// A writer into `file` (truncated first).
    ///
    /// # Errors
    ///
    /// IO errors.
    pub fn new(file: File) -> Result<Self> {
        file.set_len(0)?;
        Ok(Self { file, next_page: 3, bucket: None, buckets: Vec::new(), last_key: None })
    }

    /// Starts the next top-level bucket; names must ascend.
    ///
    /// # Errors
    ///
    /// IO errors, or a name out of order.
    pub fn bucket(&mut self, name: &[u8]) -> Result<()> {
        self.end_bucket()?;
        if self.buckets.last().is_some_and(|(last, _)| last.as_slice() >= name) {
            return Err(corrupt(format!("bucket {:?} out of order", String::from_utf8_lossy(name))));
        }
        self.bucket = Some((name.to_vec(), Level::default()));
        self.last_key = None;
        Ok(())
    }

    /// Adds a key to the current bucket; keys must ascend.
    ///
    /// # Errors
    ///
    /// IO errors, no bucket started, or a key out of order.
    pub fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if self.last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(corrupt("keys out of order"));
        }
        self.last_key = Some(key.to_vec());
        let Some((name, mut level)) = self.bucket.take() else { return Err(corrupt("a key outside any bucket")) };
        let pushed = self.push(&mut level, LEAF, 0, key.to_vec(), value.to_vec());
        self.bucket = Some((name, level));
        pushed
    }

    fn end_bucket(&mut self) -> Result<()> {
        if let Some((name, leaves)) = self.bucket.take() {
            let root = self.finish_tree(leaves, LEAF)?;
            self.buckets.push((name, root));
        }
        Ok(())
    }

    /// Adds an element to `level`, first writing the page it fills if the
    /// element would not fit (a lone element too big for a page overflows).
    fn push(&mut self, level: &mut Level, kind: u16, flags: u32, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        let size = ELEMENT + key.len() + value.len();
        if !level.elements.is_empty() && HEADER + level.bytes + size > PAGE_SIZE {
            self.flush(level, kind)?;
        }
        level.bytes += size;
        level.elements.push((flags, key, value));
        Ok(())
    }

    /// Writes `level`'s page and records it.
    fn flush(&mut self, level: &mut Level, kind: u16) -> Result<()> {
        let elements = std::mem::take(&mut level.elements);
        level.bytes = 0;
        let first = elements.first().map(|(_, k, _)| k.clone()).unwrap_or_default();
        let id = self.write_page(kind, &elements)?;
        level.written.push((first, id));
        Ok(())
    }

    /// Writes the pages left in a tree's levels, bottom up; the root page.
    fn finish_tree(&mut self, mut leaves: Level, kind: u16) -> Result<u64> {
        if !leaves.elements.is_empty() || leaves.written.is_empty() {
            self.flush(&mut leaves, kind)?; // an empty tree is one empty leaf
        }
        let mut children = leaves.written;
        while children.len() > 1 {
            let mut level = Level::default();
            for (key, id) in children {
                self.push(&mut level, BRANCH, 0, key, id.to_le_bytes().to_vec())?;
            }
            self.flush(&mut level, BRANCH)?;
            children = level.written;
        }
        Ok(children[0].1)
    }

    /// Writes one page (with overflow pages when needed); its id.
    fn write_page(&mut self, kind: u16, elements: &[(u32, Vec<u8>, Vec<u8>)]) -> Result<u64> {
        let id = self.next_page;
        let mut page = Vec::with_capacity(PAGE_SIZE);
        page.extend_from_slice(&id.to_le_bytes());
        page.extend_from_slice(&kind.to_le_bytes());
        page.extend_from_slice(&(elements.len() as u16).to_le_bytes());
        page.extend_from_slice(&0u32.to_le_bytes()); // overflow, set below
        let mut data = HEADER + elements.len() * ELEMENT;
        for (i, (flags, key, value)) in elements.iter().enumerate() {
            let pos = (data - (HEADER + i * ELEMENT)) as u32;
            if kind == BRANCH {
                page.extend_from_slice(&pos.to_le_bytes());
                page.extend_from_slice(&(key.len() as u32).to_le_bytes());
                page.extend_from_slice(value); // the child's page id
            } else {
                page.extend_from_slice(&flags.to_le_bytes());
                page.extend_from_slice(&pos.to_le_bytes());
                page.extend_from_slice(&(key.len() as u32).to_le_bytes());
                page.extend_from_slice(&(value.len() as u32).to_le_bytes());
                data += value.len();
            }
            data += key.len();
        }
        for (_, key, value) in elements {
            page.extend_from_slice(key);
            if kind != BRANCH {
                page.extend_from_slice(value);
            }
        }
        let pages = page.len().div_ceil(PAGE_SIZE).max(1);
        page.resize(pages * PAGE_SIZE, 0);
        page[12..16].copy_from_slice(&((pages - 1) as u32).to_le_bytes());
        self.file.write_all_at(&page, id * PAGE_SIZE as u64)?;
        self.next_page += pages as u64;
        Ok(id)
    }

    /// Writes the root bucket, the freelist and both metas, and syncs; the
    /// file's size in bytes.
    ///
    /// # Errors
    ///
    /// IO errors.
    pub fn finish(mut self) -> Result<u64> {
        self.end_bucket()?;
        let mut root = Level::default();
        for (name, page) in std::mem::take(&mut self.buckets) {
            let mut value = page.to_le_bytes().to_vec();
            value.extend_from_slice(&0u64.to_le_bytes()); // sequence
            self.push(&mut root, LEAF, BUCKET_FLAG, name, value)?;
        }
        let root = self.finish_tree(root, LEAF)?;
        let pages = self.next_page;
        let mut freelist = vec![0u8; PAGE_SIZE];
        freelist[..8].copy_from_slice(&2u64.to_le_bytes());
        freelist[8..10].copy_from_slice(&FREELIST.to_le_bytes());
        self.file.write_all_at(&freelist, 2 * PAGE_SIZE as u64)?;
        for txid in 0..2u64 {
            let mut page = vec![0u8; PAGE_SIZE];
            page[..8].copy_from_slice(&txid.to_le_bytes()); // page id = txid here
            page[8..10].copy_from_slice(&META.to_le_bytes());
            let m = &mut page[HEADER..HEADER + 64];
            m[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            m[4..8].copy_from_slice(&VERSION.to_le_bytes());
            m[8..12].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
            m[16..24].copy_from_slice(&root.to_le_bytes());
            m[32..40].copy_from_slice(&2u64.to_le_bytes());
            m[40..48].copy_from_slice(&pages.to_le_bytes());
            m[48..56].copy_from_slice(&txid.to_le_bytes());
            let sum = fnv1a(&m[..META_SUM_AT]);
            m[56..64].copy_from_slice(&sum.to_le_bytes());
            self.file.write_all_at(&page, txid * PAGE_SIZE as u64)?;
        }
        let size = pages * PAGE_SIZE as u64;
        self.file.set_len(size)?;
        self.file.sync_data()?;
        Ok(size)
    }
}
