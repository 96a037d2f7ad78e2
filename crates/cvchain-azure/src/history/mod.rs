//! The history table: typed rows (`cvchain_core::history`) as table entities and back, the store
//! that records them, and the claims built on its conditional writes.
//!
//! The conversion happens here and nowhere else: a time becomes an `Edm.DateTime` string with
//! its annotation, a 64-bit integer an `Edm.Int64` string, a double an `Edm.Double` number.

pub mod claims;
pub mod store;

use crate::storage::table::{Entity, StoredEntity};
use cvchain_core::history::{
    HistoryRow, Prop, Props, Value, ValueKind, parse_service_time, seal, table_datetime,
};
use serde_json::{Number, Value as Json};

fn annotation(name: &str) -> String {
    format!("{name}@odata.type")
}

/// Adds one property, with the annotation its type needs.
fn put(e: &mut Entity, prop: Prop, value: &Value) {
    let name = prop.name();
    let (json, edm) = match value {
        Value::Text(s) => (Json::String(s.clone()), None),
        Value::Bool(b) => (Json::Bool(*b), None),
        Value::Int(n) => (Json::Number((*n).into()), None),
        // OData JSON carries Int64 values as strings.
        Value::Int64(n) => (Json::String(n.to_string()), Some("Edm.Int64")),
        Value::Double(d) => match Number::from_f64(*d) {
            Some(n) => (Json::Number(n), Some("Edm.Double")),
            // Not finite: the service's spelling.
            None => (Json::String(d.to_string()), Some("Edm.Double")),
        },
        Value::Time(t) => (Json::String(table_datetime(*t)), Some("Edm.DateTime")),
    };
    e.insert(name.to_owned(), json);
    if let Some(edm) = edm {
        e.insert(annotation(name), Json::String(edm.into()));
    }
}

/// The properties as entity JSON (without keys), sealed first (`cvchain_core::history::seal`):
/// every text redacted and bounded by what the table counts, so no write carries a secret or is
/// refused as too large. The service's `Timestamp` is never written.
pub fn props_to_entity(props: &Props) -> Entity {
    let mut e = Entity::new();
    for (prop, value) in seal(props).iter() {
        if prop != Prop::Timestamp {
            put(&mut e, prop, value);
        }
    }
    e
}

/// The row as the entity a table request carries.
pub fn to_entity(row: &HistoryRow) -> Entity {
    let mut e = props_to_entity(&row.properties);
    e.insert(
        "PartitionKey".into(),
        Json::String(row.partition_key.clone()),
    );
    e.insert("RowKey".into(), Json::String(row.row_key.clone()));
    e
}

/// Reads a stored entity as a typed row. Properties cvchain does not know, and values that do
/// not read as their property's type, are left out: old or foreign rows still read.
pub fn from_entity(entity: &Entity) -> HistoryRow {
    let text = |k: &str| match entity.get(k) {
        Some(Json::String(s)) => s.clone(),
        _ => String::new(),
    };
    let mut properties = Props::new();
    for (name, json) in entity {
        let Some(prop) = Prop::from_name(name) else {
            continue;
        };
        if let Some(v) = decode(prop.kind(), json) {
            properties.set(prop, v);
        }
    }
    HistoryRow {
        partition_key: text("PartitionKey"),
        row_key: text("RowKey"),
        properties,
    }
}

/// A stored entity as a typed row.
pub fn from_stored(stored: &StoredEntity) -> HistoryRow {
    from_entity(&stored.entity)
}

fn decode(kind: ValueKind, json: &Json) -> Option<Value> {
    Some(match (kind, json) {
        (ValueKind::Text, Json::String(s)) => Value::Text(s.clone()),
        (ValueKind::Text, Json::Number(n)) => Value::Text(n.to_string()),
        (ValueKind::Text, Json::Bool(b)) => Value::Text(b.to_string()),
        (ValueKind::Bool, Json::Bool(b)) => Value::Bool(*b),
        (ValueKind::Bool, Json::String(s)) => Value::Bool(s.parse().ok()?),
        (ValueKind::Int | ValueKind::Int64, Json::Number(n)) => {
            let n = n.as_i64()?;
            if kind == ValueKind::Int {
                Value::Int(n)
            } else {
                Value::Int64(n)
            }
        }
        (ValueKind::Int | ValueKind::Int64, Json::String(s)) => {
            let n = s.trim().parse().ok()?;
            if kind == ValueKind::Int {
                Value::Int(n)
            } else {
                Value::Int64(n)
            }
        }
        (ValueKind::Double, Json::Number(n)) => Value::Double(n.as_f64()?),
        (ValueKind::Double, Json::String(s)) => Value::Double(s.trim().parse().ok()?),
        (ValueKind::Time, Json::String(s)) => Value::Time(parse_service_time(s)?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
