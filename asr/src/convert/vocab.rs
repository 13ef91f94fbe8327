//! GPT-2 byte-level token strings -> raw bytes, as whisper.cpp's vocabulary wants them.

use std::collections::HashMap;

/// GPT-2's reversible byte <-> printable-char table (`bytes_to_unicode` in OpenAI's encoder.py),
/// inverted: the printable char of each byte maps back to the byte.
fn unicode_to_byte() -> HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut map = HashMap::with_capacity(256);
    let mut next_unprintable = 0u32;
    for b in 0..=255u8 {
        let ch = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(256 + next_unprintable).expect("256..512 are valid chars");
            next_unprintable += 1;
            c
        };
        map.insert(ch, b);
    }
    map
}

/// Decodes byte-level token strings. A token with a char outside the table is an error.
pub fn decode_byte_level_tokens<'a>(
    tokens: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Vec<u8>>, String> {
    let table = unicode_to_byte();
    tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| {
            token
                .chars()
                .map(|c| {
                    table
                        .get(&c)
                        .copied()
                        .ok_or_else(|| format!("token {id} ({token:?}) is not GPT-2 byte-level"))
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_space_and_newline_markers() {
        let out = decode_byte_level_tokens(["Ġthe", "Ċ", "hello", "Ã©"]).unwrap();
        assert_eq!(out[0], b" the");
        assert_eq!(out[1], b"\n");
        assert_eq!(out[2], b"hello");
        assert_eq!(out[3], "é".as_bytes());
        assert!(decode_byte_level_tokens(["\u{4e2d}"]).is_err());
    }
}
