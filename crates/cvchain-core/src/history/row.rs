//! The typed history row: every property name defined once with its type, the row kinds and
//! statuses as enums. The storage adapter turns a row into a table entity and back
//! (`cvchain_azure::history::entity`); nothing here knows the wire format.

use crate::chain::EntryState;
use crate::notification::{EventStatus, Kind};
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// The type a property is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Text,
    Bool,
    /// A 32-bit integer (the table's default for a JSON number).
    Int,
    /// A 64-bit integer (`Edm.Int64`: carried as a string on the wire).
    Int64,
    Double,
    Time,
}

macro_rules! props {
    ($($(#[$doc:meta])* $variant:ident: $kind:ident),* $(,)?) => {
        /// A property of a history row. The name each is stored under is the variant's name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Prop {
            $($(#[$doc])* $variant),*
        }

        impl Prop {
            pub const ALL: &'static [Prop] = &[$(Prop::$variant),*];

            /// The stored property name.
            pub fn name(self) -> &'static str {
                match self {
                    $(Prop::$variant => stringify!($variant)),*
                }
            }

            pub fn kind(self) -> ValueKind {
                match self {
                    $(Prop::$variant => ValueKind::$kind),*
                }
            }

            pub fn from_name(name: &str) -> Option<Prop> {
                match name {
                    $(stringify!($variant) => Some(Prop::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

props! {
    /// The row's kind ([`RowKind`]).
    EventType: Text,
    /// The row's status ([`RowStatus`]).
    Status: Text,
    ProjectId: Text,
    IterationId: Text,
    ReceivedAt: Time,
    MessageId: Text,
    DequeueCount: Int,
    /// How the message text was wrapped: `raw` or `base64`.
    Encoding: Text,
    /// The message text as it arrived, secrets redacted, bounded.
    Raw: Text,
    RawTruncated: Bool,
    /// A base64 message's JSON, secrets redacted, bounded.
    Decoded: Text,
    DecodedTruncated: Bool,
    /// The message's `modelUri` without its query.
    ModelUri: Text,
    /// The platform named by a backup blob's `modelUri`.
    ModelPlatform: Text,
    ModelUriStatus: Text,
    UnknownType: Text,
    Version: Text,
    /// The project is outside `CVCHAIN_PROJECTS`.
    Ignored: Bool,
    /// Custom Vision confirmed what the notification says (a training's outcome): only a
    /// confirmed notification is announced as an event.
    Confirmed: Bool,
    /// How the notification was confirmed, or why it could not be.
    Confirmation: Text,
    ChainStatus: Text,
    PublishStatus: Text,
    /// Fields of Custom Vision's answers that could not be read and were taken as absent.
    DecodeNotes: Text,
    ProjectName: Text,
    IterationName: Text,
    IterationStatus: Text,
    TrainedAt: Time,
    TrainingTimeInMinutes: Int,
    DomainId: Text,
    TrainingType: Text,
    Exportable: Bool,
    ExportableTo: Text,
    Precision: Double,
    Recall: Double,
    AveragePrecision: Double,
    Platform: Text,
    Flavor: Text,
    /// 1-based position in the chain; 0 for an export outside it.
    ChainPosition: Int,
    RequestedAt: Time,
    EndedAt: Time,
    Reason: Text,
    ReleaseUrl: Text,
    ReleasePath: Text,
    ReleaseSize: Int64,
    CopyMillis: Int64,
    ReleasedAt: Time,
    /// The field a rejection is about.
    Field: Text,
    PoisonQueue: Text,
    /// [`PoisonCopy`]: whether the rejected message reached the poison queue.
    PoisonCopy: Text,
    PoisonEncoding: Text,
    /// The blob, in the container named like the poison queue, that holds a rejected message
    /// too large for the poison queue.
    PoisonBlob: Text,
    /// The row of another message that claims the same event (recorded first).
    SameEventAs: Text,
    /// How another message claiming the same event differs from this one.
    Disagreement: Text,
    /// Why a finished export has no release copy (`refused: …`), or `released`.
    ReleaseStatus: Text,
    Transient: Bool,
    Owner: Text,
    Purpose: Text,
    ExpiresAt: Time,
    /// The gate's verdict on a trained iteration: `passed` or `failed`.
    GateVerdict: Text,
    /// The rules that failed (or, when it passed, held).
    GateReasons: Text,
    /// What the notification did to the release channels.
    ChannelStatus: Text,
    /// What retention did after the chain completed.
    RetentionStatus: Text,
    /// A channel move's channel (`latest`, `production`).
    Channel: Text,
    PromotedAt: Time,
    PreviousIterationId: Text,
    PreviousIterationName: Text,
    ChannelPath: Text,
    /// The manifest revision a move made.
    Revision: Int64,
    Note: Text,
    /// A retention deletion: which iterations were kept, and why.
    Kept: Text,
    /// An outbox row: the CloudEvent's `type` (`EventType` is the row's kind).
    CloudEventType: Text,
    /// An outbox row: the CloudEvent's `id`, deterministic from the change it describes.
    EventId: Text,
    /// An outbox row: the CloudEvent's `subject`.
    Subject: Text,
    /// An outbox row: the CloudEvent's `time`.
    EventTime: Time,
    /// An outbox row: its place in the project's order of events.
    Sequence: Text,
    /// An outbox row: some sink has yet to take it (cleared when every sink delivered or gave up).
    Pending: Bool,
    /// An outbox row: the sinks it is for (`queue,eventgrid,webhook`).
    Sinks: Text,
    /// An outbox row: the whole CloudEvent, as JSON.
    CloudEvent: Text,
    /// An outbox row: the history row the event describes.
    DescribesRow: Text,
    /// An outbox row: its delivery to the Storage queue sink (JSON, `events::DeliveryState`).
    QueueDelivery: Text,
    /// An outbox row: its delivery to the Event Grid sink.
    EventGridDelivery: Text,
    /// An outbox row: its delivery to the webhook sink.
    WebhookDelivery: Text,
    /// An outbox row: its delivery to the Teams channel (`skipped` when chat is not told it).
    TeamsDelivery: Text,
    /// An outbox row: its delivery to the Slack channel.
    SlackDelivery: Text,
    /// Set by the table service on every write; never written.
    Timestamp: Time,
}

/// A property value, typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Text(String),
    Bool(bool),
    Int(i64),
    Int64(i64),
    Double(f64),
    Time(OffsetDateTime),
}

impl Value {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a person reads it in a table (times as the table stores them).
    pub fn display(&self) -> String {
        match self {
            Value::Text(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Int(n) | Value::Int64(n) => n.to_string(),
            Value::Double(d) => d.to_string(),
            Value::Time(t) => crate::history::table_datetime(*t),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<&String> for Value {
    fn from(s: &String) -> Self {
        Value::Text(s.clone())
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<OffsetDateTime> for Value {
    fn from(t: OffsetDateTime) -> Self {
        Value::Time(t)
    }
}
impl From<f64> for Value {
    fn from(d: f64) -> Self {
        Value::Double(d)
    }
}

impl PartialEq<&str> for Value {
    fn eq(&self, other: &&str) -> bool {
        self.as_text() == Some(*other)
    }
}
impl PartialEq<String> for Value {
    fn eq(&self, other: &String) -> bool {
        self.as_text() == Some(other.as_str())
    }
}
impl PartialEq<bool> for Value {
    fn eq(&self, other: &bool) -> bool {
        matches!(self, Value::Bool(b) if b == other)
    }
}
impl PartialEq<i64> for Value {
    fn eq(&self, other: &i64) -> bool {
        matches!(self, Value::Int(n) | Value::Int64(n) if n == other)
    }
}
impl PartialEq<f64> for Value {
    fn eq(&self, other: &f64) -> bool {
        matches!(self, Value::Double(d) if d == other)
    }
}
impl PartialEq<OffsetDateTime> for Value {
    fn eq(&self, other: &OffsetDateTime) -> bool {
        matches!(self, Value::Time(t) if t == other)
    }
}

/// A row's properties, typed by [`Prop`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Props(BTreeMap<Prop, Value>);

impl Props {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a property. The value must have the property's kind; an integer given for an
    /// `Int64` property (or the other way round) is converted.
    pub fn set(&mut self, prop: Prop, value: impl Into<Value>) {
        let value = match (prop.kind(), value.into()) {
            (ValueKind::Int64, Value::Int(n)) => Value::Int64(n),
            (ValueKind::Int, Value::Int64(n)) => Value::Int(n),
            (_, v) => v,
        };
        debug_assert!(kind_matches(prop.kind(), &value), "{prop:?} = {value:?}");
        self.0.insert(prop, value);
    }

    /// Sets an integer property (32- or 64-bit as the property says).
    pub fn set_int(&mut self, prop: Prop, n: i64) {
        self.set(prop, Value::Int(n));
    }

    pub fn get(&self, prop: Prop) -> Option<&Value> {
        self.0.get(&prop)
    }

    pub fn contains(&self, prop: Prop) -> bool {
        self.0.contains_key(&prop)
    }

    pub fn remove(&mut self, prop: Prop) -> Option<Value> {
        self.0.remove(&prop)
    }

    /// The text of a property, or `""` when it is absent or not text.
    pub fn text(&self, prop: Prop) -> &str {
        self.get(prop).and_then(Value::as_text).unwrap_or("")
    }

    pub fn double(&self, prop: Prop) -> Option<f64> {
        match self.get(prop)? {
            Value::Double(d) => Some(*d),
            Value::Int(n) | Value::Int64(n) => Some(*n as f64),
            _ => None,
        }
    }

    pub fn int(&self, prop: Prop) -> Option<i64> {
        match self.get(prop)? {
            Value::Int(n) | Value::Int64(n) => Some(*n),
            _ => None,
        }
    }

    pub fn time(&self, prop: Prop) -> Option<OffsetDateTime> {
        match self.get(prop)? {
            Value::Time(t) => Some(*t),
            _ => None,
        }
    }

    pub fn flag(&self, prop: Prop) -> Option<bool> {
        match self.get(prop)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn extend(&mut self, other: Props) {
        self.0.extend(other.0);
    }

    pub fn iter(&self) -> impl Iterator<Item = (Prop, &Value)> {
        self.0.iter().map(|(p, v)| (*p, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Index<Prop> for Props {
    type Output = Value;

    fn index(&self, prop: Prop) -> &Value {
        self.get(prop)
            .unwrap_or_else(|| panic!("the row has no {}", prop.name()))
    }
}

impl FromIterator<(Prop, Value)> for Props {
    fn from_iter<T: IntoIterator<Item = (Prop, Value)>>(iter: T) -> Self {
        let mut p = Props::new();
        for (k, v) in iter {
            p.set(k, v);
        }
        p
    }
}

fn kind_matches(kind: ValueKind, v: &Value) -> bool {
    matches!(
        (kind, v),
        (ValueKind::Text, Value::Text(_))
            | (ValueKind::Bool, Value::Bool(_))
            | (ValueKind::Int, Value::Int(_))
            | (ValueKind::Int64, Value::Int64(_))
            | (ValueKind::Double, Value::Double(_))
            | (ValueKind::Time, Value::Time(_))
    )
}

/// What a row records (`EventType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowKind {
    /// A notification, by its kind.
    Notification(Kind),
    /// One entry of an iteration's export chain.
    ExportStep,
    /// A message that can never be processed (also copied to the poison queue).
    Rejected,
    /// A message whose last delivery failed.
    Failed,
    /// A message moved back from the poison queue.
    Replayed,
    /// A claim on an export request or a copy.
    Claim,
    /// A release channel (or the production pointer) moved.
    ChannelMove,
    /// A channel move that could not happen (see `channels::FailedMove`).
    ChannelMoveFailed,
    /// Retention deleted an iteration.
    IterationDeleted,
    /// An outbound CloudEvent, written with the change it describes, and its delivery.
    Outbox,
}

impl RowKind {
    pub const ALL: [RowKind; 13] = [
        RowKind::Notification(Kind::ConnectionTest),
        RowKind::Notification(Kind::Training),
        RowKind::Notification(Kind::Export),
        RowKind::Notification(Kind::Unknown),
        RowKind::ExportStep,
        RowKind::Rejected,
        RowKind::Failed,
        RowKind::Replayed,
        RowKind::Claim,
        RowKind::ChannelMove,
        RowKind::ChannelMoveFailed,
        RowKind::IterationDeleted,
        RowKind::Outbox,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RowKind::Notification(Kind::ConnectionTest) => "ConnectionTest",
            RowKind::Notification(Kind::Training) => "Training",
            RowKind::Notification(Kind::Export) => "Export",
            RowKind::Notification(Kind::Unknown) => "Unknown",
            RowKind::ExportStep => "ExportStep",
            RowKind::Rejected => "Rejected",
            RowKind::Failed => "Failed",
            RowKind::Replayed => "Replayed",
            RowKind::Claim => "Claim",
            RowKind::ChannelMove => "ChannelMove",
            RowKind::ChannelMoveFailed => "ChannelMoveFailed",
            RowKind::IterationDeleted => "IterationDeleted",
            RowKind::Outbox => "Outbox",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// A row's `Status`. The spellings of the groups never overlap, so a status reads back without
/// knowing the row's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RowStatus {
    /// A notification row: the event's status.
    Event(EventStatus),
    /// An export step row: where the chain entry stands.
    Step(EntryState),
    Rejected,
    /// The host gave up on the message after its last delivery.
    GaveUp,
    Replayed,
}

impl RowStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RowStatus::Event(s) => s.as_str(),
            RowStatus::Step(s) => s.as_str(),
            RowStatus::Rejected => "Rejected",
            RowStatus::GaveUp => "GaveUp",
            RowStatus::Replayed => "Replayed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        if let Some(e) = EventStatus::parse(s) {
            return Some(RowStatus::Event(e));
        }
        if let Some(e) = EntryState::parse(s) {
            return Some(RowStatus::Step(e));
        }
        [RowStatus::Rejected, RowStatus::GaveUp, RowStatus::Replayed]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

/// Whether a rejected message's copy reached the poison queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonCopy {
    Pending,
    Sent,
    /// Too large for the poison queue: stored whole in a blob (`PoisonBlob`).
    Stored,
}

impl PoisonCopy {
    pub fn as_str(self) -> &'static str {
        match self {
            PoisonCopy::Pending => "pending",
            PoisonCopy::Sent => "sent",
            PoisonCopy::Stored => "stored",
        }
    }
}

/// One history entity.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryRow {
    pub partition_key: String,
    pub row_key: String,
    pub properties: Props,
}

impl HistoryRow {
    pub fn describe(&self) -> String {
        format!("{}/{}", self.partition_key, self.row_key)
    }

    pub fn kind(&self) -> Option<RowKind> {
        RowKind::parse(self.properties.text(Prop::EventType))
    }

    pub fn status(&self) -> Option<RowStatus> {
        RowStatus::parse(self.properties.text(Prop::Status))
    }

    pub fn set_kind(&mut self, kind: RowKind) {
        self.properties.set(Prop::EventType, kind.as_str());
    }

    pub fn set_status(&mut self, status: RowStatus) {
        self.properties.set(Prop::Status, status.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds_round_trip() {
        for p in Prop::ALL {
            assert_eq!(Prop::from_name(p.name()), Some(*p));
        }
        assert_eq!(Prop::from_name("ReleaseSize@odata.type"), None);
        for k in RowKind::ALL {
            assert_eq!(RowKind::parse(k.as_str()), Some(k));
        }
        for s in EventStatus::ALL {
            assert_eq!(RowStatus::parse(s.as_str()), Some(RowStatus::Event(s)));
        }
        for s in EntryState::ALL {
            assert_eq!(RowStatus::parse(s.as_str()), Some(RowStatus::Step(s)));
        }
        for s in [RowStatus::Rejected, RowStatus::GaveUp, RowStatus::Replayed] {
            assert_eq!(RowStatus::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn integers_follow_the_property_width() {
        let mut p = Props::new();
        p.set_int(Prop::ReleaseSize, 5);
        p.set_int(Prop::ChainPosition, 2);
        assert_eq!(p.get(Prop::ReleaseSize), Some(&Value::Int64(5)));
        assert_eq!(p.get(Prop::ChainPosition), Some(&Value::Int(2)));
        assert_eq!(p[Prop::ReleaseSize], 5);
    }
}
