//! Watches and monitors: streams of directory and membership changes, and futures that complete
//! when a node or an endpoint goes away.
//!
//! Every one of them is woken by the driver when the directory or membership changes (never by a
//! timer): a [`NameWatch`] rebuilds its view of the names under its prefix and reports the
//! difference, a [`MemberWatch`] reads the fabric's member events with a cursor of its own, and
//! the monitors look at the node or owners they watch.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use super::{Error, Fabric, Runtime};
use crate::membership::Event as MemberEvent;
use crate::node::DownReason;

/// A change of the names under a watched prefix (see [`Fabric::watch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameEvent {
    /// The name has a live owner (it had none).
    NameAdded {
        /// The endpoint name.
        name: String,
    },
    /// A node serves the name (reported after `NameAdded` for a new name).
    OwnerAdded {
        /// The endpoint name.
        name: String,
        /// The owner's node name.
        owner: String,
    },
    /// A node no longer serves the name: it withdrew it, lost it to a conflict, failed or left.
    OwnerRemoved {
        /// The endpoint name.
        name: String,
        /// The owner's node name.
        owner: String,
    },
    /// The name has no live owner any more (reported after its last `OwnerRemoved`).
    NameGone {
        /// The endpoint name.
        name: String,
    },
}

/// The live owners of each name under a prefix.
type View = BTreeMap<String, Vec<String>>;

/// Adds to `events` what turns `old` into `new`: for each name, its removed owners (then
/// `NameGone` if none is left), or `NameAdded` for a new name, then its added owners.
fn diff(old: &View, new: &View, events: &mut VecDeque<NameEvent>) {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    let none = Vec::new();
    for name in names {
        let before = old.get(name).unwrap_or(&none);
        let after = new.get(name).unwrap_or(&none);
        for owner in before.iter().filter(|o| !after.contains(o)) {
            events.push_back(NameEvent::OwnerRemoved {
                name: name.clone(),
                owner: owner.clone(),
            });
        }
        if after.is_empty() && !before.is_empty() {
            events.push_back(NameEvent::NameGone { name: name.clone() });
        }
        if before.is_empty() && !after.is_empty() {
            events.push_back(NameEvent::NameAdded { name: name.clone() });
        }
        for owner in after.iter().filter(|o| !before.contains(o)) {
            events.push_back(NameEvent::OwnerAdded {
                name: name.clone(),
                owner: owner.clone(),
            });
        }
    }
}

fn register(waiters: &mut Vec<Waker>, cx: &Context<'_>) {
    if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
        waiters.push(cx.waker().clone());
    }
}

/// The endpoint names under a prefix and their owners, as a stream of changes: made by
/// [`Fabric::watch`].
///
/// It starts with the current state (`NameAdded` and `OwnerAdded` for every live name), then
/// reports every change as this node sees it. Changes that happen between two reads are
/// reported as the difference they make: a name added and removed again before the watch is
/// polled may never show. The stream ends when the fabric shuts down. It holds a handle on the
/// fabric: the node runs while it exists.
///
/// Each directory or membership change costs a watch a rebuild of its view: in the order of the
/// names under its prefix. Watch the prefix you need.
pub struct NameWatch<R: Runtime> {
    fabric: Fabric<R>,
    view: ViewWatch<Vec<String>, NameEvent>,
}

/// What a watch of keyed state (names, key/value entries) keeps: its view of the keys under a
/// prefix, rebuilt when the directory moved, and the events that turn the old view into the new.
pub(super) struct ViewWatch<V, E> {
    prefix: String,
    view: BTreeMap<String, V>,
    /// The fabric's directory change count when `view` was made.
    seen: Option<u64>,
    pending: VecDeque<E>,
}

impl<V, E> ViewWatch<V, E> {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            view: BTreeMap::new(),
            seen: None,
            pending: VecDeque::new(),
        }
    }

    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(super) fn view(&self) -> &BTreeMap<String, V> {
        &self.view
    }

    /// The next event: rebuilds the view with `build` if the directory moved and reports the
    /// difference with `diff`; `None` once the fabric is down.
    pub(super) fn poll_next<R: Runtime>(
        &mut self,
        fabric: &Fabric<R>,
        cx: &Context<'_>,
        build: impl Fn(&crate::node::Node, &str) -> BTreeMap<String, V>,
        diff: impl Fn(&BTreeMap<String, V>, &BTreeMap<String, V>, &mut VecDeque<E>),
    ) -> Poll<Option<E>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Poll::Ready(Some(event));
            }
            let mut inner = fabric.shared.lock();
            if inner.shutdown {
                return Poll::Ready(None);
            }
            if self.seen != Some(inner.directory_changes) {
                self.seen = Some(inner.directory_changes);
                let view = build(&inner.node, &self.prefix);
                diff(&self.view, &view, &mut self.pending);
                self.view = view;
                if !self.pending.is_empty() {
                    continue;
                }
            }
            register(&mut inner.waiters.names, cx);
            return Poll::Pending;
        }
    }
}

impl<R: Runtime> std::fmt::Debug for NameWatch<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameWatch")
            .field("prefix", &self.view.prefix())
            .field("names", &self.view.view().len())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> NameWatch<R> {
    pub(super) fn new(fabric: Fabric<R>, prefix: &str) -> Self {
        Self {
            fabric,
            view: ViewWatch::new(prefix),
        }
    }

    /// The names under the prefix with their live owners, as of the last event returned.
    pub fn names(&self) -> &BTreeMap<String, Vec<String>> {
        self.view.view()
    }
}

impl<R: Runtime> futures_core::Stream for NameWatch<R> {
    type Item = NameEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<NameEvent>> {
        let this = self.get_mut();
        this.view.poll_next(
            &this.fabric,
            cx,
            |node, prefix| node.directory_view(prefix),
            diff,
        )
    }
}

/// Every membership event from the moment it is made: made by [`Fabric::watch_members`].
///
/// Each watch reads the events with a cursor of its own, so every watch sees every event. The
/// fabric keeps the last [`MEMBER_EVENT_CAPACITY`](super::MEMBER_EVENT_CAPACITY) events; a
/// watch further behind gets `Err(Error::Lagged { missed })` once, then the oldest event kept.
/// The stream ends when the fabric shuts down and the watch has read every event.
pub struct MemberWatch<R: Runtime> {
    fabric: Fabric<R>,
    cursor: u64,
}

impl<R: Runtime> std::fmt::Debug for MemberWatch<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemberWatch")
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> MemberWatch<R> {
    pub(super) fn new(fabric: Fabric<R>) -> Self {
        let cursor = fabric.shared.lock().member_events.end();
        Self { fabric, cursor }
    }
}

impl<R: Runtime> futures_core::Stream for MemberWatch<R> {
    type Item = Result<MemberEvent, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let mut inner = this.fabric.shared.lock();
        match inner.member_events.read(&mut this.cursor) {
            Err(missed) => Poll::Ready(Some(Err(Error::Lagged { missed }))),
            Ok(Some(event)) => Poll::Ready(Some(Ok(event))),
            Ok(None) if inner.shutdown => Poll::Ready(None),
            Ok(None) => {
                register(&mut inner.waiters.members, cx);
                Poll::Pending
            }
        }
    }
}

/// Completes with the reason when a node leaves or fails: made by [`Fabric::monitor_node`].
///
/// It completes at once with [`DownReason::NotFound`] if the node was not a member when the
/// monitor was made, or with its reason if it had already failed or left; with
/// [`DownReason::Shutdown`] if this fabric shuts down first. A failure or leave is not missed
/// even if the node comes back before the monitor is polled, unless the monitor falls more
/// than [`MEMBER_EVENT_CAPACITY`](super::MEMBER_EVENT_CAPACITY) events behind while it does. Monitoring this node's own name
/// completes only at shutdown. It holds a handle on the fabric: the node runs while it exists.
#[must_use = "a monitor does nothing unless awaited"]
pub struct NodeMonitor<R: Runtime> {
    fabric: Fabric<R>,
    node: String,
    /// The place in the member events from which a failure or leave of `node` counts.
    cursor: u64,
    /// Known when the monitor was made.
    down: Option<DownReason>,
}

impl<R: Runtime> std::fmt::Debug for NodeMonitor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMonitor")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> NodeMonitor<R> {
    pub(super) fn new(fabric: Fabric<R>, node: &str) -> Self {
        let (cursor, down) = {
            let inner = fabric.shared.lock();
            (
                inner.member_events.end(),
                inner.node.member_down_reason(node),
            )
        };
        Self {
            fabric,
            node: node.to_owned(),
            cursor,
            down,
        }
    }

    /// The monitored node's name.
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl<R: Runtime> Future for NodeMonitor<R> {
    type Output = DownReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DownReason> {
        let this = self.get_mut();
        if let Some(reason) = &this.down {
            return Poll::Ready(reason.clone());
        }
        let mut inner = this.fabric.shared.lock();
        let mut lagged = false;
        loop {
            match inner.member_events.read(&mut this.cursor) {
                Ok(Some(MemberEvent::MemberDead { name, .. })) if name == this.node => {
                    return Poll::Ready(DownReason::Failed);
                }
                Ok(Some(MemberEvent::MemberLeft { name, .. })) if name == this.node => {
                    return Poll::Ready(DownReason::Left);
                }
                Ok(Some(_)) => {}
                // Events were lost: the node's state now is what is left to go by.
                Err(_) => lagged = true,
                Ok(None) => break,
            }
        }
        match inner.node.member_down_reason(&this.node) {
            // Known when the monitor was made, forgotten since, and its end lost with the
            // events this monitor missed: it failed (or left) a while ago.
            Some(DownReason::NotFound) if lagged => return Poll::Ready(DownReason::Failed),
            Some(DownReason::NotFound) | None => {}
            Some(reason) => return Poll::Ready(reason),
        }
        if inner.shutdown {
            return Poll::Ready(DownReason::Shutdown);
        }
        register(&mut inner.waiters.members, cx);
        Poll::Pending
    }
}

/// Completes with the reason when an endpoint goes away: made by [`Fabric::monitor_endpoint`].
///
/// It watches the owners the name had when the monitor was made (for a group endpoint, also
/// those that join it later) and completes when none of them serves it any more, with the
/// reason of the last to go: its node [left](DownReason::Left) or
/// [failed](DownReason::Failed), it [withdrew](DownReason::Withdrawn) the endpoint, or it lost
/// an exclusive name to another node's [claim](DownReason::Conflict). It completes at once with
/// [`DownReason::NotFound`] if no live node served the name when it was made, and with
/// [`DownReason::Shutdown`] if this fabric shuts down first. It holds a handle on the fabric:
/// the node runs while it exists.
#[must_use = "a monitor does nothing unless awaited"]
pub struct EndpointMonitor<R: Runtime> {
    fabric: Fabric<R>,
    name: String,
    owners: BTreeSet<String>,
    /// A group endpoint: owners that join are watched too.
    group: bool,
    /// The fabric's directory change count when `owners` was last checked.
    seen: Option<u64>,
    down: Option<DownReason>,
}

impl<R: Runtime> std::fmt::Debug for EndpointMonitor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointMonitor")
            .field("name", &self.name)
            .field("owners", &self.owners)
            .finish_non_exhaustive()
    }
}

impl<R: Runtime> EndpointMonitor<R> {
    pub(super) fn new(fabric: Fabric<R>, name: &str) -> Self {
        let (owners, group) = {
            let inner = fabric.shared.lock();
            let owners: BTreeSet<String> = inner
                .node
                .live_owners(name)
                .into_iter()
                .map(str::to_owned)
                .collect();
            let group =
                inner.node.registry().kind(name) == Some(crate::registry::EndpointKind::Group);
            (owners, group)
        };
        let down = owners.is_empty().then_some(DownReason::NotFound);
        Self {
            fabric,
            name: name.to_owned(),
            owners,
            group,
            seen: None,
            down,
        }
    }

    /// The monitored endpoint's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<R: Runtime> Future for EndpointMonitor<R> {
    type Output = DownReason;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DownReason> {
        let this = self.get_mut();
        if let Some(reason) = &this.down {
            return Poll::Ready(reason.clone());
        }
        let mut inner = this.fabric.shared.lock();
        if this.seen != Some(inner.directory_changes) {
            this.seen = Some(inner.directory_changes);
            let node = &inner.node;
            let mut last = None;
            this.owners
                .retain(|owner| match node.owner_down_reason(&this.name, owner) {
                    Some(reason) => {
                        last = Some(reason);
                        false
                    }
                    None => true,
                });
            if this.group {
                this.owners
                    .extend(node.live_owners(&this.name).into_iter().map(str::to_owned));
            }
            if this.owners.is_empty() {
                let reason = last.unwrap_or(DownReason::Withdrawn);
                this.down = Some(reason.clone());
                return Poll::Ready(reason);
            }
        }
        if inner.shutdown {
            return Poll::Ready(DownReason::Shutdown);
        }
        register(&mut inner.waiters.names, cx);
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(entries: &[(&str, &[&str])]) -> View {
        entries
            .iter()
            .map(|(n, o)| (n.to_string(), o.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn diff_reports_names_then_owners_and_owners_then_gone() {
        let mut events = VecDeque::new();
        diff(
            &View::new(),
            &view(&[("a", &["n1", "n2"]), ("b", &["n3"])]),
            &mut events,
        );
        let added: Vec<NameEvent> = events.drain(..).collect();
        assert_eq!(added.len(), 5);
        assert_eq!(added[0], NameEvent::NameAdded { name: "a".into() });
        assert!(matches!(&added[1], NameEvent::OwnerAdded { owner, .. } if owner == "n1"));

        diff(
            &view(&[("a", &["n1", "n2"]), ("b", &["n3"])]),
            &view(&[("a", &["n2", "n4"])]),
            &mut events,
        );
        let changed: Vec<NameEvent> = events.drain(..).collect();
        assert_eq!(
            changed,
            vec![
                NameEvent::OwnerRemoved {
                    name: "a".into(),
                    owner: "n1".into()
                },
                NameEvent::OwnerAdded {
                    name: "a".into(),
                    owner: "n4".into()
                },
                NameEvent::OwnerRemoved {
                    name: "b".into(),
                    owner: "n3".into()
                },
                NameEvent::NameGone { name: "b".into() },
            ]
        );
        diff(
            &view(&[("a", &["n1"])]),
            &view(&[("a", &["n1"])]),
            &mut events,
        );
        assert!(events.is_empty());
    }
}
