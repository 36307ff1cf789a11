//! Token usage in an upstream answer, read while the body streams past (pure, no I/O).
//!
//! A [`BodyTap`] is fed the answer body chunk by chunk, gunzips it on the fly when it is
//! gzip-encoded, and keeps only bounded state: an optional head (the whole body when it is
//! small) and a rolling window of the last decoded bytes. [`BodyTap::tokens`] then finds the
//! last usage object in that window and reports it as [`Tokens`].
//!
//! Two shapes of usage are understood, in plain JSON answers, SSE streams of JSON events, and
//! Gemini's streamed JSON arrays alike:
//! - Gemini's `"usageMetadata": {"promptTokenCount", "candidatesTokenCount",
//!   "thoughtsTokenCount", "toolUsePromptTokenCount", "totalTokenCount"}`;
//! - the OpenAI-compatible `"usage": {"prompt_tokens", "completion_tokens", "total_tokens"}`.
//!
//! Streams repeat usage (Gemini: every event, growing) or send it once at the end (OpenAI, with
//! `"usage": null` before), so the last usage object in the body is the answer's total. Both
//! put it at the end of the body, which is why a tail window suffices: the usage object must
//! lie within the last 16 KiB of the decoded body to be found.

use flate2::{Crc, Decompress, FlushDecompress, Status};

/// Decoded bytes kept from the end of the body, where the usage object is looked for. The
/// usage objects are a few hundred bytes and come last (after the candidates), so 16 KiB
/// leaves ample room for the final event around them.
const TAIL: usize = 16 * 1024;

/// Largest size of the tail buffer: appending up to it and then dropping all but [`TAIL`]
/// bytes moves each byte at most once more, keeping the upkeep O(1) per byte.
const TAIL_BUF: usize = 2 * TAIL;

/// Decoder output is produced in pieces of this size, so a chunk that inflates hugely never
/// needs a buffer larger than this (it is streamed into the head and tail, both bounded).
const OUT_PIECE: usize = 8 * 1024;

/// Most decoded bytes a gzipped body may produce before decoding stops, as if it were corrupt.
/// Memory is bounded regardless; this bounds the CPU a gzip bomb can cost (deflate expands at
/// most ~1032:1, so a few MB of input could otherwise mean GBs to inflate). A real Gemini
/// answer (at most ~65k output tokens, even as verbose SSE) stays orders of magnitude below.
const MAX_DECODED: u64 = 256 << 20;

/// Tokens one answer used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Input tokens: Gemini's `promptTokenCount` + `toolUsePromptTokenCount`, or OpenAI's
    /// `prompt_tokens`.
    pub prompt: u64,
    /// Generated tokens: Gemini's `candidatesTokenCount` + `thoughtsTokenCount` (thinking is
    /// billed as output), or OpenAI's `completion_tokens` (which already include reasoning).
    pub output: u64,
    /// The total the upstream reports, or `prompt + output` when it reports none.
    pub total: u64,
}

/// Watches an answer body go by, chunk by chunk, keeping bounded state.
pub struct BodyTap {
    /// The gzip decoder, for a gzip-encoded body; `None` for an identity body.
    gunzip: Option<Gunzip>,
    /// Where decoded bytes go.
    seen: Seen,
}

impl BodyTap {
    /// `gzip`: the body is gzip-encoded (Content-Encoding: gzip) and is decoded as it goes.
    /// `keep_head`: how many decoded bytes to keep from the start (0 = none).
    pub fn new(gzip: bool, keep_head: usize) -> BodyTap {
        BodyTap {
            gunzip: gzip.then(Gunzip::new),
            seen: Seen {
                keep_head,
                head: Vec::new(),
                head_overflow: false,
                keep_prefix: false,
                tail: Vec::new(),
            },
        }
    }

    /// Keeps the first `keep_head` decoded bytes even when the body is longer (see
    /// [`BodyTap::prefix`]), instead of letting them go: for what an answer says at its start.
    pub fn keeping_prefix(mut self) -> BodyTap {
        self.seen.keep_prefix = true;
        self
    }

    /// The first decoded bytes seen so far, up to `keep_head`: the whole body or its start (see
    /// [`BodyTap::keeping_prefix`]; without it, empty once the body outgrew `keep_head`).
    pub fn prefix(&self) -> &[u8] {
        &self.seen.head
    }

    /// Feeds the next raw (possibly gzipped) chunk. Cheap: O(chunk) work, no allocation growth
    /// beyond keep_head + a fixed tail window (16 KiB, kept in a buffer of at most 32 KiB) + the
    /// decoder.
    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.gunzip {
            None => self.seen.push(chunk),
            Some(gz) => gz.feed(chunk, &mut self.seen),
        }
    }

    /// The whole decoded body, if it fit in `keep_head` bytes (None if larger, or if decoding
    /// failed). With `keep_head` 0 it is always None; for a gzipped body it is Some only once
    /// the gzip stream has ended and its checksum matched, so a truncated body is never taken
    /// for a whole one.
    pub fn head(&self) -> Option<&[u8]> {
        if self.seen.keep_head == 0 || self.seen.head_overflow {
            return None;
        }
        match &self.gunzip {
            Some(gz) if !gz.complete() => None,
            _ => Some(&self.seen.head),
        }
    }

    /// Takes the whole decoded body out of the tap, on the terms of [`BodyTap::head`]: only a
    /// body that fit in `keep_head` and, gzipped, ended and checked out.
    pub fn take_head(&mut self) -> Option<Vec<u8>> {
        self.head()?;
        Some(std::mem::take(&mut self.seen.head))
    }

    /// Bytes the head buffer holds now (its capacity), for a caller that counts its memory.
    pub fn head_held(&self) -> usize {
        self.seen.head.capacity()
    }

    /// Whether the body outgrew `keep_head`, so that [`BodyTap::head`] will never be whole.
    pub fn head_lost(&self) -> bool {
        self.seen.head_overflow
    }

    /// Stops keeping the head and frees it (token usage is still read from the tail).
    pub fn drop_head(&mut self) {
        self.seen.head = Vec::new();
        self.seen.head_overflow = true;
    }

    /// The usage the body reports: the LAST usage object in it (streams repeat or end with it).
    /// Computed from the tail window on each call; None when the window holds no usable one.
    pub fn tokens(&self) -> Option<Tokens> {
        last_usage(&self.seen.tail)
    }

    /// Bytes the head and tail buffers hold (their capacities), to check they stay bounded.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.seen.head.capacity() + self.seen.tail.capacity()
    }
}

/// The decoded bytes a tap keeps: a bounded head and the rolling tail window.
struct Seen {
    /// Most bytes kept in `head`; 0 keeps none.
    keep_head: usize,
    /// The body's first decoded bytes, while they fit in `keep_head`.
    head: Vec<u8>,
    /// The body outgrew `keep_head`: `head` was released and stays empty, or with
    /// `keep_prefix` holds the first `keep_head` bytes.
    head_overflow: bool,
    /// Whether `head` keeps the body's first bytes when the body outgrows it.
    keep_prefix: bool,
    /// The last decoded bytes: at least the last [`TAIL`] of them (or all, if fewer), at most
    /// [`TAIL_BUF`].
    tail: Vec<u8>,
}

impl Seen {
    /// Takes the next decoded bytes.
    fn push(&mut self, data: &[u8]) {
        self.push_head(data);
        self.push_tail(data);
    }

    fn push_head(&mut self, data: &[u8]) {
        if self.keep_head == 0 || self.head_overflow || data.is_empty() {
            return;
        }
        let room = self.keep_head - self.head.len();
        if data.len() > room {
            self.head_overflow = true;
            if self.keep_prefix {
                grow_within(&mut self.head, room, self.keep_head);
                self.head.extend_from_slice(&data[..room]);
            } else {
                // Too big to keep whole: a partial head is of no use, so free it now.
                self.head = Vec::new();
            }
            return;
        }
        grow_within(&mut self.head, data.len(), self.keep_head);
        self.head.extend_from_slice(data);
    }

    fn push_tail(&mut self, data: &[u8]) {
        if data.len() >= TAIL {
            // The chunk alone fills the window: keep only its end.
            self.tail.clear();
            grow_within(&mut self.tail, TAIL, TAIL_BUF);
            self.tail.extend_from_slice(&data[data.len() - TAIL..]);
            return;
        }
        if self.tail.len() + data.len() > TAIL_BUF {
            // Drop the oldest bytes so that the window is exactly TAIL after appending. Here
            // tail.len() > TAIL > TAIL - data.len(), so something is dropped, and this happens
            // at most once per TAIL bytes appended.
            let keep = TAIL - data.len();
            self.tail.drain(..self.tail.len() - keep);
        }
        grow_within(&mut self.tail, data.len(), TAIL_BUF);
        self.tail.extend_from_slice(data);
    }
}

/// Makes room in `v` for `extra` more bytes, doubling as `Vec` does but never past `limit`
/// (which the caller guarantees `v.len() + extra` stays within), so capacity stays bounded.
fn grow_within(v: &mut Vec<u8>, extra: usize, limit: usize) {
    let need = v.len() + extra;
    if need > v.capacity() {
        let want = need
            .max(v.capacity().saturating_mul(2))
            .min(limit)
            .max(need);
        v.reserve_exact(want - v.len());
    }
}

/// A streaming gzip decoder (RFC 1952) that writes into a [`Seen`].
///
/// Written on `flate2::Decompress` (raw deflate) with the member framing by hand, because
/// neither of flate2's gzip decoders fits a tap that is pushed chunks and must know after each
/// one whether the body so far is whole:
/// - `write::GzDecoder` / `write::MultiGzDecoder` check a member's CRC only in `try_finish`
///   (after which a write may panic) or when the next member starts, so they cannot tell that
///   the last member ended and checked out; here every trailer is checked as it arrives, so
///   [`BodyTap::head`] can refuse a truncated or corrupt body;
/// - `bufread::GzDecoder` over a buffer that answers `WouldBlock` when empty does resume, but
///   it asks for input before draining the inflater, so decoded bytes still pending when a chunk
///   runs out stay stuck until the next chunk: a body cut short loses up to 32 KiB of its end,
///   where the usage object is (`truncated_big_gzip_decodes_to_the_cut` guards this). Its header
///   parser also stores FNAME, FCOMMENT and FEXTRA (up to 64 KiB each); here they are skipped.
struct Gunzip {
    /// Where the decoder is in the gzip format.
    step: Step,
    /// The member header's FLG byte, with each optional field's bit cleared once skipped.
    flags: u8,
    /// Raw deflate decoder (its state, window included, is boxed inside flate2: about 40 KiB, fixed).
    inflate: Decompress,
    /// CRC-32 and length of the current member's decoded bytes, checked against its trailer.
    crc: Crc,
    /// Decoded bytes so far, all members.
    decoded: u64,
    /// Largest `decoded` allowed; [`MAX_DECODED`] except in tests.
    max_decoded: u64,
}

/// A position in the gzip format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The fixed 10-byte member header; `n` bytes of it seen.
    Fixed { n: u8 },
    /// FEXTRA's 2-byte little-endian length; its low byte if seen.
    ExtraLen { lo: Option<u8> },
    /// FEXTRA's data, `left` bytes to skip.
    Extra { left: u16 },
    /// FNAME or FCOMMENT: a zero-terminated string to skip (either is at most as long as
    /// the body, and nothing of it is stored).
    ToNul,
    /// FHCRC, `left` bytes to skip.
    HeaderCrc { left: u8 },
    /// The deflate data.
    Body,
    /// The 8-byte trailer (CRC-32, ISIZE), `n` bytes of it seen into `buf`.
    Trailer { buf: [u8; 8], n: u8 },
    /// A member ended and checked out; more bytes would start another member.
    Done,
    /// Decoding stopped for good: corrupt data, or the decoded-size limit.
    Failed,
}

/// Gzip header flag bits (RFC 1952, 2.3.1).
const FHCRC: u8 = 1 << 1;
const FEXTRA: u8 = 1 << 2;
const FNAME: u8 = 1 << 3;
const FCOMMENT: u8 = 1 << 4;
const FRESERVED: u8 = 0b1110_0000;

impl Gunzip {
    fn new() -> Gunzip {
        Gunzip {
            step: Step::Fixed { n: 0 },
            flags: 0,
            inflate: Decompress::new(false),
            crc: Crc::new(),
            decoded: 0,
            max_decoded: MAX_DECODED,
        }
    }

    /// The bytes fed so far form whole, verified gzip members.
    fn complete(&self) -> bool {
        self.step == Step::Done
    }

    /// Decodes `input` into `out`; on corrupt data stops for good (the body still passes
    /// through the gateway untouched; only the tap stops reading it).
    fn feed(&mut self, input: &[u8], out: &mut Seen) {
        if self.step != Step::Failed && self.decode(input, out).is_err() {
            self.step = Step::Failed;
        }
    }

    fn decode(&mut self, mut input: &[u8], out: &mut Seen) -> Result<(), Corrupt> {
        while let Some((&byte, rest)) = input.split_first() {
            match self.step {
                Step::Failed => return Err(Corrupt),
                Step::Body => {
                    input = self.inflate_some(input, out)?;
                    continue;
                }
                Step::Done => {
                    // Another member follows (RFC 1952 allows several); anything else is
                    // caught by the header check.
                    self.step = Step::Fixed { n: 0 };
                    continue;
                }
                Step::Fixed { n } => {
                    let ok = match n {
                        0 => byte == 0x1f,
                        1 => byte == 0x8b,
                        2 => byte == 8, // CM = deflate, the only method defined
                        3 => byte & FRESERVED == 0,
                        _ => true, // MTIME, XFL, OS: not needed
                    };
                    if !ok {
                        return Err(Corrupt);
                    }
                    if n == 3 {
                        self.flags = byte;
                    }
                    self.step = if n == 9 {
                        self.after_header_field()
                    } else {
                        Step::Fixed { n: n + 1 }
                    };
                }
                Step::ExtraLen { lo: None } => self.step = Step::ExtraLen { lo: Some(byte) },
                Step::ExtraLen { lo: Some(lo) } => {
                    let left = u16::from_le_bytes([lo, byte]);
                    self.step = Step::Extra { left };
                    if left == 0 {
                        self.flags &= !FEXTRA;
                        self.step = self.after_header_field();
                    }
                }
                Step::Extra { left } => {
                    // Skip as much of the extra field as this input holds, in one go.
                    let take = input.len().min(usize::from(left));
                    input = &input[take..];
                    let left = left - take as u16; // take <= left, a u16
                    self.step = Step::Extra { left };
                    if left == 0 {
                        self.flags &= !FEXTRA;
                        self.step = self.after_header_field();
                    }
                    continue;
                }
                Step::ToNul => {
                    if byte == 0 {
                        // FNAME comes before FCOMMENT: clear whichever is pending first.
                        if self.flags & FNAME != 0 {
                            self.flags &= !FNAME;
                        } else {
                            self.flags &= !FCOMMENT;
                        }
                        self.step = self.after_header_field();
                    }
                }
                Step::HeaderCrc { left } => {
                    // The header CRC is optional and rarely sent; skipped, not checked.
                    self.step = if left > 1 {
                        Step::HeaderCrc { left: left - 1 }
                    } else {
                        self.flags &= !FHCRC;
                        self.after_header_field()
                    };
                }
                Step::Trailer { mut buf, n } => {
                    buf[usize::from(n) % 8] = byte;
                    self.step = Step::Trailer { buf, n: n + 1 };
                    if n + 1 == 8 {
                        let crc = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                        let size = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
                        // ISIZE is the length mod 2^32, as is Crc::amount.
                        if crc != self.crc.sum() || size != self.crc.amount() {
                            return Err(Corrupt);
                        }
                        self.step = Step::Done;
                    }
                }
            }
            input = rest;
        }
        Ok(())
    }

    /// The next part of the member header still to skip, or the body once none is left.
    fn after_header_field(&mut self) -> Step {
        if self.flags & FEXTRA != 0 {
            Step::ExtraLen { lo: None }
        } else if self.flags & (FNAME | FCOMMENT) != 0 {
            Step::ToNul
        } else if self.flags & FHCRC != 0 {
            Step::HeaderCrc { left: 2 }
        } else {
            self.inflate.reset(false);
            self.crc.reset();
            Step::Body
        }
    }

    /// Inflates from `input` until it is used up (and pending output drained) or the deflate
    /// stream ends; returns the input left over (the trailer and beyond).
    fn inflate_some<'a>(
        &mut self,
        mut input: &'a [u8],
        out: &mut Seen,
    ) -> Result<&'a [u8], Corrupt> {
        let mut piece = [0u8; OUT_PIECE];
        loop {
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let status = self
                .inflate
                .decompress(input, &mut piece, FlushDecompress::None)
                .map_err(|_| Corrupt)?;
            // Both deltas are bounded by the slices' lengths; `get` keeps that unchecked
            // assumption from ever becoming a panic.
            let used = delta(self.inflate.total_in(), in0);
            let made = delta(self.inflate.total_out(), out0);
            input = input.get(used..).ok_or(Corrupt)?;
            let produced = piece.get(..made).ok_or(Corrupt)?;
            if !produced.is_empty() {
                self.decoded = self.decoded.saturating_add(made as u64);
                if self.decoded > self.max_decoded {
                    return Err(Corrupt);
                }
                self.crc.update(produced);
                out.push(produced);
            }
            if status == Status::StreamEnd {
                self.step = Step::Trailer { buf: [0; 8], n: 0 };
                return Ok(input);
            }
            if made == 0 && used == 0 {
                // No progress: either the input is used up and nothing is pending, or the
                // decoder is stuck on input it will not take, which a valid stream never does.
                return if input.is_empty() {
                    Ok(input)
                } else {
                    Err(Corrupt)
                };
            }
            if input.is_empty() && made < piece.len() {
                // Input used up and the output had room to spare: nothing is pending.
                return Ok(input);
            }
        }
    }
}

/// How far a decoder counter moved, as a slice length (usize::MAX if it cannot be one, which
/// the slicing that follows turns into an error rather than a panic).
fn delta(now: u64, before: u64) -> usize {
    usize::try_from(now.saturating_sub(before)).unwrap_or(usize::MAX)
}

/// The gzip data cannot be decoded (or decodes to more than the tap will process).
#[derive(Debug)]
struct Corrupt;

/// Which usage key was found, and so which field names its object uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Gemini's `"usageMetadata"`.
    Gemini,
    /// The OpenAI-compatible `"usage"`.
    OpenAi,
}

/// Most usage keys tried, from the last back, before giving up. Each try may scan to the end
/// of the window (an object cut off, or never closed), so an unbounded number would make a
/// window full of such keys cost O(TAIL^2); real streams have the answer in the last few.
const MAX_TRIES: usize = 64;

/// The last usable usage object in `window`: the last unescaped `"usageMetadata"` or `"usage"`
/// key followed by `:` and an object with at least one of the expected counts. Occurrences
/// that fail (`null`, cut off by the window's end, not JSON, no counts) are skipped in favour
/// of the one before.
fn last_usage(window: &[u8]) -> Option<Tokens> {
    // Built once: building a searcher costs about what one search of the window does.
    static PREFIX: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(b"\"usage"));
    let mut end = window.len();
    for _ in 0..MAX_TRIES {
        // The last `"usage` within window[..end].
        let at = PREFIX.rfind(&window[..end])?;
        if let Some(tokens) = usage_at(window, at) {
            return Some(tokens);
        }
        end = at;
    }
    None
}

/// The usage whose key's opening quote is at `at`, if it is a real key with a usable object.
fn usage_at(window: &[u8], at: usize) -> Option<Tokens> {
    // Inside a JSON string every quote is escaped by an odd run of backslashes: such a
    // `\"usage\"` is text (e.g. the model talking about JSON), not a key. In valid JSON an
    // unescaped quote followed by `usage"` and `:` can only open an object key.
    let backslashes = window[..at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    if backslashes % 2 == 1 {
        return None;
    }
    let after = &window[at + b"\"usage".len()..];
    let (shape, rest) = if let Some(rest) = after.strip_prefix(b"Metadata\"") {
        (Shape::Gemini, rest)
    } else if let Some(rest) = after.strip_prefix(b"\"") {
        (Shape::OpenAi, rest)
    } else {
        return None; // `"usage_foo"`, `"usages"`, ...
    };
    let rest = skip_ws(rest).strip_prefix(b":")?;
    let rest = skip_ws(rest);
    // `null` (OpenAI streams before the last chunk) and anything else not an object fail here.
    let object = balanced_object(rest)?;
    match shape {
        Shape::Gemini => gemini_tokens(object),
        Shape::OpenAi => openai_tokens(object),
    }
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// The `{...}` object at the start of `s`, balanced while skipping strings (and their
/// escapes), or None if `s` does not start with `{` or the object is cut off.
fn balanced_object(s: &[u8]) -> Option<&[u8]> {
    if s.first() != Some(&b'{') {
        return None;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &b) in s.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(&s[..=i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// A count field of a usage object: absent, or not a non-negative integer, reads as None.
/// Tokens from a Gemini `usageMetadata` object. Only its top-level counts are read; the
/// per-modality `*Details` arrays are ignored. `cachedContentTokenCount` is not added: it is a
/// part of `promptTokenCount`.
fn gemini_tokens(object: &[u8]) -> Option<Tokens> {
    let [prompt, tool, candidates, thoughts, total] = counts::read(
        object,
        &[
            "promptTokenCount",
            "toolUsePromptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
            "totalTokenCount",
        ],
    )?;
    if [prompt, tool, candidates, thoughts, total]
        .iter()
        .all(Option::is_none)
    {
        return None;
    }
    let prompt = prompt.unwrap_or(0).saturating_add(tool.unwrap_or(0));
    let output = candidates
        .unwrap_or(0)
        .saturating_add(thoughts.unwrap_or(0));
    Some(Tokens {
        prompt,
        output,
        total: total.unwrap_or(prompt.saturating_add(output)),
    })
}

/// Tokens from an OpenAI-compatible `usage` object. Only its top-level counts are read, so
/// the counts nested in `prompt_tokens_details` / `completion_tokens_details` never mix in.
fn openai_tokens(object: &[u8]) -> Option<Tokens> {
    let [prompt, completion, total, ..] = counts::read(
        object,
        &["prompt_tokens", "completion_tokens", "total_tokens"],
    )?;
    if [prompt, completion, total].iter().all(Option::is_none) {
        return None;
    }
    let prompt = prompt.unwrap_or(0);
    let output = completion.unwrap_or(0);
    Some(Tokens {
        prompt,
        output,
        total: total.unwrap_or(prompt.saturating_add(output)),
    })
}

mod counts;

#[cfg(test)]
mod tests;
