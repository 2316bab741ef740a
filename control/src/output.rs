//! Docker-like aligned tables and `--format json`.

use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Format {
    #[default]
    Table,
    Json,
}

/// `--format` of listings and inspect: `table`, `json`, or a Go template (Docker's). Help
/// and completion offer the two names; any other text is taken as a template.
#[derive(Clone, Copy, Debug)]
pub struct TemplateFormat;

impl clap::builder::TypedValueParser for TemplateFormat {
    type Value = String;

    fn parse_ref(
        &self,
        _command: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<String, clap::Error> {
        value
            .to_str()
            .map(str::to_owned)
            .ok_or_else(|| clap::Error::new(clap::error::ErrorKind::InvalidUtf8))
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            ["table", "json"]
                .into_iter()
                .map(clap::builder::PossibleValue::new),
        ))
    }
}

/// Columns padded to their widest cell, separated by three spaces, no trailing blanks.
pub fn table<const N: usize>(headers: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; N]| {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 < N {
                text.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            } else {
                text.push_str(cell);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers);
    for row in rows {
        line(row.each_ref().map(String::as_str));
    }
    out
}

pub fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("API types always serialize") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns_columns_without_trailing_spaces() {
        let out = table(
            ["NODE", "ADDRESS", "AGENT"],
            &[
                ["node1".into(), "192.168.77.11".into(), "up".into()],
                ["node10".into(), "10.0.0.1".into(), "".into()],
            ],
        );
        assert_eq!(
            out,
            "NODE     ADDRESS         AGENT\n\
             node1    192.168.77.11   up\n\
             node10   10.0.0.1\n"
        );
    }
}
