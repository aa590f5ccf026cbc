//! The way a connection came in; shared by the pipeline, its report and the registry of
//! live connections (its own room, so none of them imports another for it).

/// The way a connection came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    /// From a local pod's app, captured by connect4/6.
    Outbound,
    /// To a local pod from outside the mesh, handed over by sk_lookup.
    Inbound,
    /// To a local pod through a tunnel from another node's pod.
    Tunnel,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Tunnel => "tunnel",
        }
    }
}
