//! Just enough HPACK (RFC 7541) to find a client's `:authority` in a header
//! block and cut its scheme, without decoding the rest of the block.
//!
//! The server is handed the client's block byte for byte, except each
//! literal `:authority` field whose value has a scheme: that field is sent
//! again with the static table's name and the cut value. Indexed fields are
//! never touched, so the server's dynamic table stays in step with the
//! client's: the only entries that differ are rewritten `:authority`
//! entries, at the same place in both tables and smaller in the server's.
//! The server therefore evicts no entry before the client does, every index
//! the client sends names the same entry in both tables, and an indexed
//! `:authority` resolves, in the server, to the value already cut.
//!
//! What is decoded: names given as literals, and the values of fields the
//! client adds to its table (their lengths count toward its size), and of
//! `:authority` fields. A request whose path is sent as a literal without
//! indexing (as Rust's HTTP/2 client sends every path) costs no decoding.

use std::collections::VecDeque;

use loona_hpack::huffman::HuffmanDecoder;

/// The names of HPACK's static table, index 1 first (RFC 7541, Appendix A):
/// an entry's size counts its name.
const STATIC_NAMES: [&str; 61] = [
    ":authority",
    ":method",
    ":method",
    ":path",
    ":path",
    ":scheme",
    ":scheme",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    ":status",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "accept",
    "access-control-allow-origin",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "content-disposition",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-range",
    "content-type",
    "cookie",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "link",
    "location",
    "max-forwards",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "refresh",
    "retry-after",
    "server",
    "set-cookie",
    "strict-transport-security",
    "transfer-encoding",
    "user-agent",
    "vary",
    "via",
    "www-authenticate",
];
/// The static table's index of `:authority`.
const AUTHORITY: usize = 1;
/// HTTP/2's SETTINGS_HEADER_TABLE_SIZE, which the server keeps: the most a
/// client's table may hold.
const TABLE_SIZE: usize = 4096;
/// What HPACK adds to the name and value lengths of an entry.
const ENTRY_OVERHEAD: usize = 32;

/// A header block the scanner could not follow: the server, which decodes
/// it too, ends the connection with a compression error.
#[derive(Debug, PartialEq)]
pub struct Malformed;

/// A client's dynamic table entry, as far as the scanner needs it.
struct Entry {
    authority: bool,
    name_len: usize,
    size: usize,
}

/// One connection's view of its client's dynamic table.
pub struct Scanner {
    /// Newest first, as HPACK indexes them.
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
    huffman: HuffmanDecoder,
}

impl Default for Scanner {
    fn default() -> Self {
        Self { entries: VecDeque::new(), size: 0, max: TABLE_SIZE, huffman: HuffmanDecoder::new() }
    }
}

impl Scanner {
    /// `block` as the server must see it: `None` when it passes unchanged.
    ///
    /// # Errors
    ///
    /// [`Malformed`] when `block` is not valid HPACK.
    pub fn rewrite(&mut self, block: &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
        let mut out: Option<Vec<u8>> = None;
        let mut at = 0;
        while at < block.len() {
            let start = at;
            let first = block[at];
            let mut field = None;
            if first & 0x80 != 0 {
                // Indexed: passes as it is (see the module's note).
                at += integer(&block[at..], 7)?.1;
            } else if first & 0xe0 == 0x20 {
                let (max, n) = integer(&block[at..], 5)?;
                at += n;
                if max > TABLE_SIZE {
                    return Err(Malformed);
                }
                self.max = max;
                self.evict(0);
            } else {
                let indexing = first & 0xc0 == 0x40;
                let (index, n) = integer(&block[at..], if indexing { 6 } else { 4 })?;
                at += n;
                let (authority, name_len) = if index == 0 {
                    let (raw, huffman, n) = string(&block[at..])?;
                    at += n;
                    let name = self.decode(raw, huffman)?;
                    (name == b":authority", name.len())
                } else {
                    self.name(index)?
                };
                let (raw, huffman, n) = string(&block[at..])?;
                at += n;
                let mut value_len = raw.len();
                if authority || (indexing && huffman) {
                    let value = self.decode(raw, huffman)?;
                    value_len = value.len();
                    if let Some(cut) = authority.then(|| strip_scheme(&value)).flatten() {
                        let size = name_len + value_len + ENTRY_OVERHEAD;
                        // An entry too large for the client's table empties
                        // it and is not added: the server must not add the
                        // smaller one either.
                        let prefix = match first & 0xf0 {
                            _ if indexing && size <= self.max => 0x40,
                            _ if indexing => 0x00,
                            kind => kind,
                        };
                        field = Some(literal(prefix | AUTHORITY as u8, &cut));
                    }
                }
                if indexing {
                    self.insert(Entry { authority, name_len, size: name_len + value_len + ENTRY_OVERHEAD });
                }
            }
            match (field, out.as_mut()) {
                (Some(field), _) => out.get_or_insert_with(|| block[..start].to_vec()).extend_from_slice(&field),
                (None, Some(out)) => out.extend_from_slice(&block[start..at]),
                (None, None) => {}
            }
        }
        Ok(out)
    }

    /// Whether the name at `index` is `:authority`, and its length.
    fn name(&self, index: usize) -> Result<(bool, usize), Malformed> {
        match index {
            1..=61 => Ok((index == AUTHORITY, STATIC_NAMES[index - 1].len())),
            _ => {
                let e = self.entries.get(index - 62).ok_or(Malformed)?;
                Ok((e.authority, e.name_len))
            }
        }
    }

    fn decode(&mut self, raw: &[u8], huffman: bool) -> Result<Vec<u8>, Malformed> {
        if huffman {
            self.huffman.decode(raw).map_err(|_| Malformed)
        } else {
            Ok(raw.to_vec())
        }
    }

    fn insert(&mut self, e: Entry) {
        if e.size > self.max {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict(e.size);
        self.size += e.size;
        self.entries.push_front(e);
    }

    /// Drops the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max {
            let Some(old) = self.entries.pop_back() else { break };
            self.size -= old.size;
        }
    }
}

/// An HPACK integer with an `n`-bit prefix at the start of `buf`, and the
/// bytes it takes.
fn integer(buf: &[u8], n: u32) -> Result<(usize, usize), Malformed> {
    let mask = (1u8 << n) - 1;
    let first = buf.first().ok_or(Malformed)? & mask;
    if first < mask {
        return Ok((usize::from(first), 1));
    }
    let mut value = usize::from(mask);
    for (i, &b) in buf[1..].iter().enumerate() {
        // Five continuation bytes hold more than any length a bounded
        // block can use.
        if i >= 5 {
            return Err(Malformed);
        }
        value += usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok((value, i + 2));
        }
    }
    Err(Malformed)
}

/// A string literal at the start of `buf`: its octets as sent, whether
/// they are Huffman-coded, and the bytes it takes.
fn string(buf: &[u8]) -> Result<(&[u8], bool, usize), Malformed> {
    let huffman = buf.first().ok_or(Malformed)? & 0x80 != 0;
    let (len, n) = integer(buf, 7)?;
    let end = n.checked_add(len).ok_or(Malformed)?;
    Ok((buf.get(n..end).ok_or(Malformed)?, huffman, end))
}

/// A literal field: `first` (its kind and name index), then `value` as
/// plain octets.
fn literal(first: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_integer(&mut out, value.len(), 7);
    out.extend_from_slice(value);
    out
}

/// Appends `value` as an HPACK integer with an `n`-bit prefix whose other
/// bits are zero.
fn put_integer(out: &mut Vec<u8>, mut value: usize, n: u32) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(value as u8);
        return;
    }
    out.push(mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `http://host:port[/...]` → `host:port`; `None` when there is no scheme.
pub fn strip_scheme(value: &[u8]) -> Option<Vec<u8>> {
    let at = value.windows(3).position(|w| w == b"://")?;
    let rest = &value[at + 3..];
    let end = rest.iter().position(|b| *b == b'/').unwrap_or(rest.len());
    Some(rest[..end].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Decoder;

    /// The static table's names, as the scanner counts them, against a
    /// full HPACK decoder's.
    #[test]
    fn static_names_match_a_decoder() {
        for index in 1..=61u8 {
            let block = [0x40 | index, 1, b'v'];
            let decoded = Decoder::new().decode(&block).unwrap();
            let mut scan = Scanner::default();
            assert_eq!(scan.rewrite(&block), Ok(None));
            assert_eq!(scan.entries[0].name_len, decoded[0].0.len(), "static index {index}");
            assert_eq!(scan.entries[0].authority, decoded[0].0 == b":authority");
        }
    }

    #[test]
    fn integers_round_trip_and_overlong_ones_are_malformed() {
        for n in [4, 5, 6, 7] {
            for value in [0usize, 1, (1 << n) - 2, (1 << n) - 1, 1 << n, 300, 70_000, 1 << 30] {
                let mut out = Vec::new();
                put_integer(&mut out, value, n);
                assert_eq!(integer(&out, n), Ok((value, out.len())), "{value} with a {n}-bit prefix");
            }
        }
        assert_eq!(integer(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01], 7), Err(Malformed));
        assert_eq!(integer(&[0x7f, 0x80], 7), Err(Malformed), "cut short");
    }

    /// Tables kept in step: a client whose `:authority` entries (schemed,
    /// so the server holds them smaller) are pushed out by other entries,
    /// then named by index, decodes in a server to the same fields, cut.
    #[test]
    fn the_servers_table_stays_in_step_through_evictions() {
        let mut enc = loona_hpack::Encoder::new();
        let (mut scan, mut server, mut client) = (Scanner::default(), Decoder::new(), Decoder::new());
        for i in 0..300 {
            let auth = format!("http://10.0.0.{}:2379", i % 7);
            let filler = format!("{i:0>width$}", width = 50 + i % 200);
            let headers = [
                (&b":authority"[..], auth.as_bytes()),
                (b"x-filler", filler.as_bytes()),
                (b":authority", auth.as_bytes()),
            ];
            let block = enc.encode(headers);
            let sent = scan.rewrite(&block).unwrap().unwrap_or(block.clone());
            let want: Vec<_> = client
                .decode(&block)
                .unwrap()
                .into_iter()
                .map(|(n, v)| if n == b":authority" { (n, strip_scheme(&v).unwrap()) } else { (n, v) })
                .collect();
            assert_eq!(server.decode(&sent).unwrap(), want, "request {i}");
        }
    }
}
