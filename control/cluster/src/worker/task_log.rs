//! Reading a task's log file for `service logs`: its tail, or for a follower the complete
//! lines after the offset where its last read ended (a line still being written waits for
//! its newline, so no line is split or shown twice).

use std::{
    fs::File,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
};

use anyhow::{Context as _, Result};

/// Most lines of one answer; a follower gets the rest on its next read.
pub const LINES_CAP: usize = 10_000;

/// Most bytes read for a follower at once (its next read goes on from there).
const CHUNK_MAX: u64 = 4 << 20;

/// The whole log (none yet: empty).
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// The last `count` lines of `text` and the offset after them; `complete_only` leaves out a
/// last line without its newline (a follower reads it once it is complete).
pub fn tail(text: &[u8], count: usize, complete_only: bool) -> (Vec<String>, u64) {
    let text = if complete_only {
        complete_part(text)
    } else {
        text
    };
    let end = text.len() as u64;
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().collect();
    let lines = lines[lines.len().saturating_sub(count)..]
        .iter()
        .map(|l| l.to_string())
        .collect();
    (lines, end)
}

/// The complete lines after `offset` (at most `LINES_CAP`) and the offset after them. A log
/// shorter than `offset` is another file than the one read before: read from its start.
pub fn after(path: &Path, offset: u64) -> Result<(Vec<String>, u64)> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], 0)),
        Err(err) => return Err(err).with_context(|| format!("opening {}", path.display())),
    };
    let len = file.metadata()?.len();
    let start = if offset > len { 0 } else { offset };
    file.seek(SeekFrom::Start(start))?;
    let mut chunk = Vec::new();
    file.take(CHUNK_MAX)
        .read_to_end(&mut chunk)
        .with_context(|| format!("reading {}", path.display()))?;
    let (lines, used) = complete_lines(&chunk, LINES_CAP);
    Ok((lines, start + used))
}

/// Up to `cap` newline-ended lines at the start of `chunk`, and the bytes they take.
fn complete_lines(chunk: &[u8], cap: usize) -> (Vec<String>, u64) {
    let mut lines = Vec::new();
    let mut used = 0;
    for line in chunk.split_inclusive(|&b| b == b'\n') {
        if lines.len() == cap || line.last() != Some(&b'\n') {
            break;
        }
        used += line.len();
        let line = String::from_utf8_lossy(&line[..line.len() - 1]);
        lines.push(line.trim_end_matches('\r').to_owned());
    }
    (lines, used as u64)
}

/// `text` up to and with its last newline.
fn complete_part(text: &[u8]) -> &[u8] {
    let end = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_reads_each_complete_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "one\ntwo\nthr").unwrap();
        let (first, end) = tail(&read(&path), 1, true);
        assert_eq!((first, end), (vec!["two".to_owned()], 8));
        assert_eq!(
            after(&path, end).unwrap(),
            (vec![], 8),
            "a partial line waits"
        );
        std::fs::write(&path, "one\ntwo\nthree\r\nfour\n").unwrap();
        let (next, end) = after(&path, end).unwrap();
        assert_eq!(next, ["three", "four"]);
        assert_eq!(end, 20);
        std::fs::write(&path, "new\n").unwrap();
        assert_eq!(
            after(&path, end).unwrap(),
            (vec!["new".to_owned()], 4),
            "a shorter file is read from its start"
        );
        assert_eq!(after(&dir.path().join("none"), 0).unwrap(), (vec![], 0));
    }

    #[test]
    fn the_plain_tail_shows_a_partial_last_line() {
        let (lines, end) = tail(b"a\nb\nc", 2, false);
        assert_eq!(lines, ["b", "c"]);
        assert_eq!(end, 5);
    }

    #[test]
    fn a_follower_gets_at_most_the_cap_and_goes_on_from_there() {
        let (lines, used) = complete_lines(b"a\nb\nc\n", 2);
        assert_eq!((lines, used), (vec!["a".to_owned(), "b".to_owned()], 4));
    }
}
