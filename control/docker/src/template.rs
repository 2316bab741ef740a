//! `--format` as Docker's: a Go text/template (gtmpl, a maintained port of Go's engine)
//! applied to each object, with Docker's `json`, `join`, `lower` and `upper` functions, and
//! the `table` prefix that adds a header and aligns the columns `\t` separates.

use std::{collections::HashMap, fmt};

use anyhow::{Context as _, Result};
use gtmpl::{Context, FuncError, Template, Value};
use serde::{
    de::{self, DeserializeSeed, Deserializer as _, MapAccess, SeqAccess, Visitor},
    Serialize,
};

/// Where an object keeps its fields' order when it is not alphabetical (gtmpl's objects are
/// hash maps; Docker's `json` writes a struct's fields in their declared order). Not a name a
/// template can write after a dot.
const ORDER: &str = "\u{0}order";

/// A parsed `--format` template.
pub struct Format {
    template: Template,
    /// `table ...`: a header line, columns aligned.
    table: bool,
}

impl Format {
    /// `text` is what follows `--format` (other than `table` and `json` alone, which the
    /// commands handle themselves); `\t` and `\n` written literally are a tab and a newline,
    /// as in Docker.
    pub fn parse(text: &str, default_columns: &str) -> Result<Self> {
        let text = text.replace("\\t", "\t").replace("\\n", "\n");
        let (table, body) = match text.strip_prefix("table") {
            Some(rest) => (true, rest.trim_start().to_owned()),
            None => (false, text),
        };
        let body = if table && body.is_empty() {
            default_columns.to_owned()
        } else {
            body
        };
        let mut template = Template::default();
        template.add_funcs(&[
            ("json", json as gtmpl::Func),
            ("join", join as gtmpl::Func),
            ("lower", lower as gtmpl::Func),
            ("upper", upper as gtmpl::Func),
        ]);
        template
            .parse(body.as_str())
            .map_err(|e| anyhow::anyhow!("template parsing error: {e}"))?;
        Ok(Self { template, table })
    }

    pub fn render_one<T: Serialize>(&self, object: &T) -> Result<String> {
        let value = to_value(object)?;
        self.template
            .render(&Context::from(value))
            .map_err(|e| anyhow::anyhow!("template: {e}"))
    }

    /// Each object on its own line; with `table`, under a header made by rendering the
    /// template over `headers` (field name -> column title), the columns aligned.
    pub fn render<T: Serialize>(&self, objects: &[T], headers: &[(&str, &str)]) -> Result<String> {
        let mut lines = Vec::new();
        if self.table {
            let header: HashMap<String, Value> = headers
                .iter()
                .map(|(field, title)| ((*field).to_owned(), Value::from(*title)))
                .collect();
            lines.push(
                self.template
                    .render(&Context::from(Value::Object(header)))
                    .map_err(|e| anyhow::anyhow!("template: {e}"))?,
            );
        }
        for object in objects {
            lines.push(self.render_one(object)?);
        }
        let mut out = if self.table {
            align(&lines)
        } else {
            lines.join("\n")
        };
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        Ok(out)
    }
}

/// Docker's tabwriter: cells at least 10 wide, 3 spaces of padding, the last one unpadded.
fn align(lines: &[String]) -> String {
    let rows: Vec<Vec<&str>> = lines.iter().map(|l| l.split('\t').collect()).collect();
    let mut widths: Vec<usize> = Vec::new();
    for row in &rows {
        for (i, cell) in row.iter().enumerate().take(row.len().saturating_sub(1)) {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    rows.iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 < row.len() {
                    let width = (widths[i] + 3).max(10);
                    line.push_str(&format!("{cell:<width$}"));
                } else {
                    line.push_str(cell);
                }
            }
            line.trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A serializable value as a template's data, objects remembering their fields' order.
pub fn to_value<T: Serialize>(object: &T) -> Result<Value> {
    let text = serde_json::to_string(object)?;
    serde_json::Deserializer::from_str(&text)
        .deserialize_any(GoValue)
        .context("converting to template data")
}

struct GoValue;

impl<'de> DeserializeSeed<'de> for GoValue {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for GoValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(GoValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut order = Vec::new();
        let mut fields = HashMap::new();
        while let Some(key) = map.next_key::<String>()? {
            fields.insert(key.clone(), map.next_value_seed(GoValue)?);
            order.push(key);
        }
        if !order.is_sorted() {
            fields.insert(
                ORDER.to_owned(),
                Value::Array(order.into_iter().map(Value::from).collect()),
            );
        }
        Ok(Value::Object(fields))
    }
}

/// Docker's `json`: the value as compact JSON, fields in their order.
fn json(args: &[Value]) -> Result<Value, FuncError> {
    let [value] = args else {
        return Err(FuncError::ExactlyXArgs("json".into(), 1));
    };
    let mut out = String::new();
    write_json(value, &mut out);
    Ok(Value::from(out))
}

fn write_json(value: &Value, out: &mut String) {
    let quote = |s: &str| serde_json::to_string(s).unwrap_or_default();
    match value {
        Value::NoValue | Value::Nil | Value::Function(_) => out.push_str("null"),
        Value::Bool(b) => out.push_str(&b.to_string()),
        Value::String(s) => out.push_str(&quote(s)),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, out);
            }
            out.push(']');
        }
        Value::Object(fields) | Value::Map(fields) => {
            let keys: Vec<String> = match fields.get(ORDER) {
                Some(Value::Array(order)) => order.iter().map(ToString::to_string).collect(),
                _ => {
                    let mut keys: Vec<String> = fields.keys().cloned().collect();
                    keys.sort();
                    keys
                }
            };
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&quote(key));
                out.push(':');
                write_json(&fields[key], out);
            }
            out.push('}');
        }
    }
}

fn strings(args: &[Value]) -> Vec<String> {
    match args.first() {
        Some(Value::Array(items)) => items.iter().map(ToString::to_string).collect(),
        _ => Vec::new(),
    }
}

/// `join LIST SEPARATOR`
fn join(args: &[Value]) -> Result<Value, FuncError> {
    let [_, separator] = args else {
        return Err(FuncError::ExactlyXArgs("join".into(), 2));
    };
    Ok(Value::from(strings(args).join(&separator.to_string())))
}

fn lower(args: &[Value]) -> Result<Value, FuncError> {
    let [value] = args else {
        return Err(FuncError::ExactlyXArgs("lower".into(), 1));
    };
    Ok(Value::from(value.to_string().to_lowercase()))
}

fn upper(args: &[Value]) -> Result<Value, FuncError> {
    let [value] = args else {
        return Err(FuncError::ExactlyXArgs("upper".into(), 1));
    };
    Ok(Value::from(value.to_string().to_uppercase()))
}
