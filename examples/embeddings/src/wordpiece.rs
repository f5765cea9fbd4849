//! BERT's uncased tokenizer: normalization, pre-tokenization and greedy WordPiece, matching the
//! Hugging Face `BertTokenizerFast` that all-MiniLM-L6-v2 ships with.
//!
//! The vocabulary is a sorted static table generated at build time, so nothing is built per
//! request (each request runs in a fresh instance, where a hash map would be rebuilt every time).

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

include!(concat!(env!("OUT_DIR"), "/vocab.rs"));

/// Words longer than this (in chars) become `[UNK]`, as in the reference tokenizer.
const MAX_WORD_CHARS: usize = 100;

pub(crate) fn id(token: &str) -> Option<u32> {
    VOCAB
        .binary_search_by(|(t, _)| (*t).cmp(token))
        .ok()
        .map(|i| VOCAB[i].1)
}

/// Ids of the special tokens, looked up once per call from the table.
pub(crate) struct Specials {
    pub(crate) cls: u32,
    pub(crate) sep: u32,
    pub(crate) pad: u32,
    pub(crate) unk: u32,
}

impl Specials {
    pub(crate) fn get() -> Option<Specials> {
        Some(Specials {
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
        })
    }
}

/// `[CLS] pieces… [SEP]`, truncated to `max_len` ids in all.
pub(crate) fn encode(text: &str, specials: &Specials, max_len: usize) -> Vec<u32> {
    let mut ids = vec![specials.cls];
    let budget = max_len.saturating_sub(1);
    'words: for word in pre_tokenize(&normalize(text)) {
        for piece in wordpiece(&word, specials.unk) {
            if ids.len() == budget {
                break 'words;
            }
            ids.push(piece);
        }
    }
    ids.push(specials.sep);
    ids
}

/// Clean control characters, space out CJK ideographs, strip accents and lowercase.
fn normalize(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\0' || c == '\u{fffd}' || is_control(c) {
            continue;
        }
        if is_cjk(c) {
            cleaned.push(' ');
            cleaned.push(c);
            cleaned.push(' ');
        } else if c.is_whitespace() {
            cleaned.push(' ');
        } else {
            cleaned.push(c);
        }
    }
    cleaned
        .nfd()
        .filter(|&c| !is_combining_mark(c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whitespace splits words; every punctuation character is a word of its own.
fn pre_tokenize(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for chunk in text.split_whitespace() {
        let mut current = String::new();
        for c in chunk.chars() {
            if is_punctuation(c) {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
                words.push(c.to_string());
            } else {
                current.push(c);
            }
        }
        if !current.is_empty() {
            words.push(current);
        }
    }
    words
}

/// Greedy longest-match-first; a word with any unmatched remainder is `[UNK]` as a whole.
fn wordpiece(word: &str, unk: u32) -> Vec<u32> {
    if word.chars().count() > MAX_WORD_CHARS {
        return vec![unk];
    }
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut candidate = String::with_capacity(word.len() + 2);
    while start < word.len() {
        let mut end = word.len();
        let mut found = None;
        while start < end {
            candidate.clear();
            if start > 0 {
                candidate.push_str("##");
            }
            candidate.push_str(&word[start..end]);
            if let Some(id) = id(&candidate) {
                found = Some(id);
                break;
            }
            // Step back one whole character.
            end = word[..end]
                .char_indices()
                .next_back()
                .map_or(start, |(i, _)| i);
        }
        match found {
            Some(id) => {
                pieces.push(id);
                start = end;
            }
            None => return vec![unk],
        }
    }
    pieces
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    c.is_control()
        || matches!(c as u32,
            0x00AD | 0x0600..=0x0605 | 0x061C | 0x06DD | 0x070F | 0x180E | 0x200B..=0x200F
            | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB
            | 0xE000..=0xF8FF | 0xF0000..=0x10FFFF)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B920..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// ASCII punctuation and symbols, plus Unicode's punctuation (P*) blocks.
fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32,
            0x00A1 | 0x00A7 | 0x00AB | 0x00B6 | 0x00B7 | 0x00BB | 0x00BF | 0x037E | 0x0387
            | 0x055A..=0x055F | 0x0589..=0x058A | 0x05BE | 0x05C0 | 0x05C3 | 0x05C6
            | 0x05F3..=0x05F4 | 0x0609..=0x060A | 0x060C..=0x060D | 0x061B | 0x061D..=0x061F
            | 0x066A..=0x066D | 0x06D4 | 0x0964..=0x0965 | 0x0970 | 0x0E4F | 0x0E5A..=0x0E5B
            | 0x2010..=0x2027 | 0x2030..=0x2043 | 0x2045..=0x2051 | 0x2053..=0x205E
            | 0x2308..=0x230B | 0x2329..=0x232A | 0x2768..=0x2775 | 0x27C5..=0x27C6
            | 0x27E6..=0x27EF | 0x2983..=0x2998 | 0x29D8..=0x29DB | 0x29FC..=0x29FD
            | 0x2CF9..=0x2CFC | 0x2CFE..=0x2CFF | 0x2E00..=0x2E2E | 0x2E30..=0x2E4F
            | 0x3001..=0x3003 | 0x3008..=0x3011 | 0x3014..=0x301F | 0x3030 | 0x303D | 0x30A0
            | 0x30FB | 0xFE10..=0xFE19 | 0xFE30..=0xFE52 | 0xFE54..=0xFE61 | 0xFE63 | 0xFE68
            | 0xFE6A..=0xFE6B | 0xFF01..=0xFF03 | 0xFF05..=0xFF0A | 0xFF0C..=0xFF0F
            | 0xFF1A..=0xFF1B | 0xFF1F..=0xFF20 | 0xFF3B..=0xFF3D | 0xFF3F | 0xFF5B | 0xFF5D
            | 0xFF5F..=0xFF65)
}
