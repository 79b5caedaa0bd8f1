//! Guest pages on the wire: [`PageBatch`] carries up to [`MAX_BATCH_PAGES`] pages of
//! [`PAGE_SIZE`] bytes.
//!
//! A batch lists guest-physical page numbers; an all-zero page is one bit in `zero_map` and
//! has no payload; the other pages are concatenated in order and, when that makes the batch
//! smaller, lz4-compressed as one block (`compressed` says which). The encoder
//! ([`PageBatchBuilder`]) takes pages straight from guest memory; the decoder
//! ([`PageBatch::decode`]) checks every length against the page count before it allocates, so a
//! hostile batch is an error, never a large allocation or a panic.

use std::borrow::Cow;

use bincode::{Decode, Encode};

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Most pages in one batch (1 MiB of page data).
pub const MAX_BATCH_PAGES: usize = 256;

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// One batch of pages as it travels in a [`crate::frame::Message::Pages`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Default, Encode, Decode)]
pub struct PageBatch {
    /// Guest-physical page numbers (address / [`PAGE_SIZE`]), in batch order.
    pub gpns: Vec<u64>,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) set: page `i` is all zeros and has no payload.
    pub zero_map: Vec<u8>,
    /// Whether `payload` is one lz4 block (else the raw concatenated pages).
    pub compressed: bool,
    /// The non-zero pages, in order.
    pub payload: Vec<u8>,
}

/// Errors decoding a batch from the network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("batch of {0} pages exceeds the maximum of {MAX_BATCH_PAGES}")]
    TooManyPages(usize),
    #[error("zero map of {got} bytes for {pages} pages")]
    ZeroMapLength { got: usize, pages: usize },
    #[error("zero map marks pages beyond the batch")]
    ZeroMapPadding,
    #[error("payload of {got} bytes, expected {expected}")]
    PayloadLength { got: usize, expected: usize },
    #[error("lz4 payload does not decompress: {0}")]
    Decompress(String),
}

/// How the builder treats the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Never compress.
    Never,
    /// Compress when the lz4 block is smaller than the raw pages.
    Auto,
}

/// The batch is full; [`PageBatchBuilder::finish`] it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page batch is full ({MAX_BATCH_PAGES} pages)")]
pub struct BatchFull;

/// True when every byte of `page` is zero.
pub fn is_zero_page(page: &[u8; PAGE_SIZE]) -> bool {
    // OR-fold in 64-byte chunks: vectorises, and stops early on typical non-zero pages.
    page.as_chunks::<64>()
        .0
        .iter()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// Collects pages into a [`PageBatch`].
#[derive(Debug)]
pub struct PageBatchBuilder {
    gpns: Vec<u64>,
    zero_map: Vec<u8>,
    raw: Vec<u8>,
    scratch: Vec<u8>,
    spare_gpns: Option<Vec<u64>>,
    spare_payload: Option<Vec<u8>>,
    compression: Compression,
}

impl Default for PageBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl PageBatchBuilder {
    /// A builder that compresses when it pays.
    pub fn new() -> Self {
        Self::with_compression(Compression::Auto)
    }

    pub fn with_compression(compression: Compression) -> Self {
        PageBatchBuilder {
            gpns: Vec::with_capacity(MAX_BATCH_PAGES),
            zero_map: Vec::with_capacity(MAX_BATCH_PAGES / 8),
            raw: Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE),
            scratch: Vec::new(),
            spare_gpns: None,
            spare_payload: None,
            compression,
        }
    }

    /// Adds one page (copied now, so guest memory may change after the call).
    pub fn push(&mut self, gpn: u64, page: &[u8; PAGE_SIZE]) -> Result<(), BatchFull> {
        let i = self.gpns.len();
        if i >= MAX_BATCH_PAGES {
            return Err(BatchFull);
        }
        if i.is_multiple_of(8) {
            self.zero_map.push(0);
        }
        self.gpns.push(gpn);
        if is_zero_page(page) {
            if let Some(last) = self.zero_map.last_mut() {
                *last |= 1 << (i % 8);
            }
        } else {
            self.raw.extend_from_slice(page);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.gpns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gpns.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.gpns.len() >= MAX_BATCH_PAGES
    }

    /// Pages pushed so far that were all zeros.
    pub fn zero_pages(&self) -> usize {
        self.zero_map.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// Hands back a sent batch's buffers for the next batches to reuse.
    pub fn recycle(&mut self, batch: PageBatch) {
        let PageBatch {
            mut gpns,
            mut payload,
            ..
        } = batch;
        if self.spare_gpns.is_none() {
            gpns.clear();
            self.spare_gpns = Some(gpns);
        }
        if self.spare_payload.is_none() && payload.capacity() >= MAX_BATCH_PAGES * PAGE_SIZE {
            payload.clear();
            self.spare_payload = Some(payload);
        }
    }

    fn fresh_raw(&mut self) -> Vec<u8> {
        self.spare_payload
            .take()
            .unwrap_or_else(|| Vec::with_capacity(MAX_BATCH_PAGES * PAGE_SIZE))
    }

    /// Takes the batch and leaves the builder empty for the next one.
    pub fn finish(&mut self) -> PageBatch {
        let next_gpns = self
            .spare_gpns
            .take()
            .unwrap_or_else(|| Vec::with_capacity(MAX_BATCH_PAGES));
        let gpns = std::mem::replace(&mut self.gpns, next_gpns);
        let zero_map = std::mem::take(&mut self.zero_map);
        let mut compressed = false;
        let payload = if self.compression == Compression::Auto && !self.raw.is_empty() {
            let max = lz4_flex::block::get_maximum_output_size(self.raw.len());
            self.scratch.resize(max, 0);
            match lz4_flex::block::compress_into(&self.raw, &mut self.scratch) {
                Ok(n) if n < self.raw.len() => {
                    compressed = true;
                    self.raw.clear();
                    let mut out = self.fresh_raw();
                    out.extend_from_slice(&self.scratch[..n]);
                    out
                }
                _ => {
                    let next = self.fresh_raw();
                    std::mem::replace(&mut self.raw, next)
                }
            }
        } else {
            let next = self.fresh_raw();
            std::mem::replace(&mut self.raw, next)
        };
        PageBatch {
            gpns,
            zero_map,
            compressed,
            payload,
        }
    }
}

/// A checked batch whose pages can be read back.
#[derive(Debug)]
pub struct DecodedBatch<'a> {
    gpns: &'a [u64],
    zero_map: &'a [u8],
    data: Cow<'a, [u8]>,
}

impl<'a> DecodedBatch<'a> {
    /// `(gpn, page)` for every page, in batch order; zero pages read as zeros.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8; PAGE_SIZE])> + '_ {
        let mut pages = self.data.as_chunks::<PAGE_SIZE>().0.iter();
        self.gpns.iter().enumerate().map(move |(i, &gpn)| {
            let zero = self.zero_map[i / 8] & (1 << (i % 8)) != 0;
            let page = if zero {
                &ZERO_PAGE
            } else {
                // `decode` checked that there is exactly one chunk per non-zero page.
                pages.next().unwrap_or(&ZERO_PAGE)
            };
            (gpn, page)
        })
    }

    pub fn len(&self) -> usize {
        self.gpns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gpns.is_empty()
    }
}

impl PageBatch {
    /// Number of pages in the batch.
    pub fn len(&self) -> usize {
        self.gpns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gpns.is_empty()
    }

    /// Bytes of page data the batch stands for (pages × [`PAGE_SIZE`]).
    pub fn page_bytes(&self) -> usize {
        self.gpns.len() * PAGE_SIZE
    }

    /// Checks the batch and decompresses its payload into a new buffer.
    pub fn decode(&self) -> Result<DecodedBatch<'_>, PageError> {
        let mut out = Vec::new();
        self.check_and_decompress(&mut out)?;
        Ok(self.decoded(if self.compressed {
            Cow::Owned(out)
        } else {
            Cow::Borrowed(&self.payload[..])
        }))
    }

    /// Like [`PageBatch::decode`], decompressing into `scratch` so a receiver reuses one buffer.
    pub fn decode_with<'a>(
        &'a self,
        scratch: &'a mut Vec<u8>,
    ) -> Result<DecodedBatch<'a>, PageError> {
        self.check_and_decompress(scratch)?;
        Ok(self.decoded(if self.compressed {
            Cow::Borrowed(&scratch[..])
        } else {
            Cow::Borrowed(&self.payload[..])
        }))
    }

    fn decoded<'a>(&'a self, data: Cow<'a, [u8]>) -> DecodedBatch<'a> {
        DecodedBatch {
            gpns: &self.gpns,
            zero_map: &self.zero_map,
            data,
        }
    }

    /// Validates the batch; when it is compressed, leaves the pages in `out`.
    /// Checks the page numbers and zero map, and returns the payload length an uncompressed
    /// batch must have.
    pub(crate) fn check_layout(&self) -> Result<usize, PageError> {
        let n = self.gpns.len();
        if n > MAX_BATCH_PAGES {
            return Err(PageError::TooManyPages(n));
        }
        if self.zero_map.len() != n.div_ceil(8) {
            return Err(PageError::ZeroMapLength {
                got: self.zero_map.len(),
                pages: n,
            });
        }
        if !n.is_multiple_of(8) {
            let last = self.zero_map[n / 8];
            if last >> (n % 8) != 0 {
                return Err(PageError::ZeroMapPadding);
            }
        }
        let zeros: usize = self.zero_map.iter().map(|b| b.count_ones() as usize).sum();
        Ok((n - zeros) * PAGE_SIZE)
    }

    /// Whether page `i` of the batch is all zeros (and has no payload).
    pub fn is_zero(&self, i: usize) -> bool {
        self.zero_map[i / 8] & (1 << (i % 8)) != 0
    }

    fn check_and_decompress(&self, out: &mut Vec<u8>) -> Result<(), PageError> {
        let expected = self.check_layout()?;
        if self.compressed {
            // `expected` is at most MAX_BATCH_PAGES pages: a bounded allocation.
            out.clear();
            out.resize(expected, 0);
            let got = lz4_flex::block::decompress_into(&self.payload, out)
                .map_err(|e| PageError::Decompress(e.to_string()))?;
            if got != expected {
                return Err(PageError::PayloadLength { got, expected });
            }
        } else if self.payload.len() != expected {
            return Err(PageError::PayloadLength {
                got: self.payload.len(),
                expected,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        // splitmix64 of the seed, so that neighbouring seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let mut x = (z ^ (z >> 31)) | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    fn random_page(seed: u64) -> Box<[u8; PAGE_SIZE]> {
        let mut next = xorshift(seed);
        let mut p = Box::new([0u8; PAGE_SIZE]);
        for c in p.chunks_exact_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        p
    }

    fn text_page(seed: u64) -> Box<[u8; PAGE_SIZE]> {
        let mut p = Box::new([0u8; PAGE_SIZE]);
        let line = format!("page {seed} of a compressible guest heap; ");
        for (i, b) in p.iter_mut().enumerate() {
            *b = line.as_bytes()[i % line.len()];
        }
        p
    }

    fn roundtrip(pages: &[(u64, Box<[u8; PAGE_SIZE]>)], c: Compression) -> PageBatch {
        let mut b = PageBatchBuilder::with_compression(c);
        for (gpn, p) in pages {
            b.push(*gpn, p).unwrap();
        }
        let batch = b.finish();
        assert!(b.is_empty());
        let d = batch.decode().unwrap();
        let got: Vec<(u64, [u8; PAGE_SIZE])> = d.iter().map(|(g, p)| (g, *p)).collect();
        assert_eq!(got.len(), pages.len());
        for ((g0, p0), (g1, p1)) in pages.iter().zip(&got) {
            assert_eq!(g0, g1);
            assert!(p0[..] == p1[..], "page {g0} differs");
        }
        batch
    }

    #[test]
    fn zero_pages_cost_one_bit() {
        let pages: Vec<_> = (0..100).map(|g| (g, Box::new([0u8; PAGE_SIZE]))).collect();
        let batch = roundtrip(&pages, Compression::Auto);
        assert!(batch.payload.is_empty());
        assert_eq!(batch.zero_map.len(), 13);
        assert!(!batch.compressed);
    }

    #[test]
    fn incompressible_pages_travel_raw() {
        let pages: Vec<_> = (0..64).map(|g| (g * 3, random_page(g + 1))).collect();
        let batch = roundtrip(&pages, Compression::Auto);
        assert!(!batch.compressed);
        assert_eq!(batch.payload.len(), 64 * PAGE_SIZE);
    }

    #[test]
    fn compressible_pages_are_compressed() {
        let pages: Vec<_> = (0..64).map(|g| (1000 + g, text_page(g))).collect();
        let batch = roundtrip(&pages, Compression::Auto);
        assert!(batch.compressed);
        assert!(batch.payload.len() < 64 * PAGE_SIZE / 4);
        let raw = roundtrip(&pages, Compression::Never);
        assert!(!raw.compressed);
        assert_eq!(raw.payload.len(), 64 * PAGE_SIZE);
    }

    #[test]
    fn mixed_batch_keeps_order_and_a_page_with_one_late_byte_is_not_zero() {
        let mut late = Box::new([0u8; PAGE_SIZE]);
        late[PAGE_SIZE - 1] = 1;
        let pages = vec![
            (9, random_page(3)),
            (2, Box::new([0u8; PAGE_SIZE])),
            (7, late),
            (1 << 40, text_page(5)),
            (3, Box::new([0u8; PAGE_SIZE])),
        ];
        let batch = roundtrip(&pages, Compression::Auto);
        assert_eq!(batch.zero_map, vec![0b10010]);
    }

    #[test]
    fn builder_stops_at_the_maximum() {
        let mut b = PageBatchBuilder::new();
        let z = [0u8; PAGE_SIZE];
        for g in 0..MAX_BATCH_PAGES as u64 {
            b.push(g, &z).unwrap();
        }
        assert!(b.is_full());
        assert_eq!(b.push(999, &z), Err(BatchFull));
        assert_eq!(b.zero_pages(), MAX_BATCH_PAGES);
        let batch = b.finish();
        assert_eq!(batch.len(), MAX_BATCH_PAGES);
        assert!(batch.decode().is_ok());
    }

    #[test]
    fn recycled_buffers_and_scratch_decoding_carry_no_stale_pages() {
        let mut b = PageBatchBuilder::with_compression(Compression::Never);
        for g in 0..MAX_BATCH_PAGES as u64 {
            b.push(g, &random_page(g)).unwrap();
        }
        let first = b.finish();
        b.recycle(first);
        b.push(7, &text_page(7)).unwrap();
        b.push(8, &[0; PAGE_SIZE]).unwrap();
        let second = b.finish();
        assert_eq!(second.gpns, vec![7, 8]);
        assert_eq!(second.payload.len(), PAGE_SIZE);

        // Decoding a small compressed batch into a scratch buffer that held a large one.
        let mut scratch = vec![0xee; 10 * PAGE_SIZE];
        let c = roundtrip(&[(1, text_page(1)), (2, text_page(2))], Compression::Auto);
        assert!(c.compressed);
        let d = c.decode_with(&mut scratch).unwrap();
        let pages: Vec<_> = d.iter().map(|(g, p)| (g, *p)).collect();
        assert_eq!(pages.len(), 2);
        assert!(pages[0].1[..] == text_page(1)[..]);
        assert!(pages[1].1[..] == text_page(2)[..]);
    }

    #[test]
    fn hostile_batches_are_errors() {
        let good = roundtrip(
            &[(1, random_page(1)), (2, text_page(2))],
            Compression::Never,
        );

        let mut b = good.clone();
        b.gpns = vec![0; MAX_BATCH_PAGES + 1];
        assert!(matches!(b.decode(), Err(PageError::TooManyPages(_))));

        let mut b = good.clone();
        b.zero_map.push(0);
        assert!(matches!(b.decode(), Err(PageError::ZeroMapLength { .. })));

        let mut b = good.clone();
        b.zero_map[0] |= 0x80;
        assert_eq!(b.decode().unwrap_err(), PageError::ZeroMapPadding);

        let mut b = good.clone();
        b.payload.pop();
        assert!(matches!(b.decode(), Err(PageError::PayloadLength { .. })));

        // A compressed flag on raw data, and a valid lz4 block of the wrong size.
        let mut b = good.clone();
        b.compressed = true;
        assert!(b.decode().is_err());
        let mut b = good.clone();
        b.compressed = true;
        b.payload = lz4_flex::block::compress(&[0u8; 3 * PAGE_SIZE]);
        assert!(b.decode().is_err());
        // A tiny block claiming to expand hugely cannot allocate more than the page count.
        let mut b = good;
        b.compressed = true;
        b.payload = vec![0xff; 64];
        assert!(b.decode().is_err());
    }

    #[derive(Debug, Clone)]
    enum Kind {
        Zero,
        Random(u64),
        Text(u64),
        Sparse(u16, u8),
    }

    fn page_of(k: &Kind) -> Box<[u8; PAGE_SIZE]> {
        match k {
            Kind::Zero => Box::new([0; PAGE_SIZE]),
            Kind::Random(s) => random_page(*s),
            Kind::Text(s) => text_page(*s),
            Kind::Sparse(at, v) => {
                let mut p = Box::new([0; PAGE_SIZE]);
                p[*at as usize % PAGE_SIZE] = *v;
                p
            }
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Zero),
            any::<u64>().prop_map(Kind::Random),
            any::<u64>().prop_map(Kind::Text),
            (any::<u16>(), any::<u8>()).prop_map(|(a, v)| Kind::Sparse(a, v)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn random_batches_round_trip(
            items in proptest::collection::vec((any::<u64>(), kind()), 0..=MAX_BATCH_PAGES),
            auto in any::<bool>(),
        ) {
            let pages: Vec<_> = items.iter().map(|(g, k)| (*g, page_of(k))).collect();
            let c = if auto { Compression::Auto } else { Compression::Never };
            let batch = roundtrip(&pages, c);
            let mut scratch = Vec::new();
            let a: Vec<_> = batch.decode().unwrap().iter().map(|(g, p)| (g, p.to_vec())).collect();
            let b: Vec<_> = batch.decode_with(&mut scratch).unwrap().iter().map(|(g, p)| (g, p.to_vec())).collect();
            prop_assert_eq!(a, b);
            // Through the wire codec too.
            let msg = crate::frame::Message::Pages(batch.clone());
            let bytes = crate::frame::encode_frame(&msg).unwrap();
            let (back, _) = crate::frame::decode_frame(&bytes).unwrap();
            prop_assert_eq!(back, msg);
            if auto && batch.compressed {
                let nonzero = batch.len() - batch.zero_map.iter().map(|b| b.count_ones() as usize).sum::<usize>();
                prop_assert!(batch.payload.len() < nonzero * PAGE_SIZE);
            }
        }
    }
}
