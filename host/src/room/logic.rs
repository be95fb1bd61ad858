//! The room's plugin: which one serves it, starting and switching instances, recovering
//! from a failed call, and carrying out the actions a call returns.

use std::sync::Arc;

use tokio::time::Instant;

use super::actor::{Admission, Logic, RoomActor};
use super::{Invite, MAX_FORWARD_HOPS, RoomEvent};
use crate::cluster::Role;
use crate::cluster::wire::{Delivery, InEvent};
use crate::plugin::{Action, MemberId, Payload, Plugin, PluginError, RoomInstance, RoomView};
use crate::types::CloseReason;
use crate::ws::frame::close_code;

impl RoomActor {
    /// Record which plugin and version serve the room, for the admin API.
    pub(super) fn show_logic(&mut self) {
        let shown = match &self.logic {
            // A follower runs no instance; it shows the plugin its owner runs.
            Logic::Default if self.follows() => self
                .plugins
                .for_room(&self.room.name)
                .map(|plugin| (plugin.name().to_owned(), self.plugins.version_of(&plugin))),
            Logic::Default => None,
            Logic::Plugin { instance, .. } => {
                let plugin = instance.plugin();
                Some((plugin.name().to_owned(), self.plugins.version_of(plugin)))
            }
            Logic::Failed { plugin } => Some((plugin.name().to_owned(), self.plugins.version_of(plugin))),
        };
        *self.room.plugin.lock().expect("room lock") = shown;
        self.refresh_history();
        self.refresh_compression();
    }

    /// Compress as the server and the room's plugin say.
    pub(super) fn refresh_compression(&mut self) {
        let Some(rooms) = self.rooms.upgrade() else { return };
        self.compress = match &self.logic {
            Logic::Default => rooms.compression_for(None),
            Logic::Plugin { instance, .. } => rooms.compression_for(Some(instance.plugin())),
            Logic::Failed { plugin } => rooms.compression_for(Some(plugin)),
        };
    }

    /// Keep history as the room's plugin (or, without one, the server) says: start
    /// one (or continue the one the room left when it last emptied), apply new limits,
    /// or drop it.
    pub(super) fn refresh_history(&mut self) {
        let Some(rooms) = self.rooms.upgrade() else { return };
        let plugin = match &self.logic {
            Logic::Default => None,
            Logic::Plugin { instance, .. } => Some(instance.plugin().clone()),
            Logic::Failed { plugin } => Some(plugin.clone()),
        };
        // In cluster mode the room's owner (or a node alone while Redis is away) keeps
        // it; followers get offsets with the owner's deliveries.
        let runs = self.cluster.as_ref().is_none_or(|c| matches!(c.role, Role::Owner | Role::Solo));
        let limits = if runs { rooms.history_limits(plugin.as_deref()) } else { None };
        let stored = self.stored_history.take();
        match (limits, &mut self.history) {
            (None, history) => *history = None,
            (Some(limits), Some(history)) => history.set_limits(limits),
            (Some(limits), history @ None) => {
                let restored = stored.and_then(|stored| rooms.restore_history(limits, &stored));
                *history = Some(restored.unwrap_or_else(|| rooms.history_for(&self.room.name, limits)));
            }
        }
    }

    /// Switch to the plugin that now serves this room, if the plugin set changed.
    /// Runs between two events, never during one.
    pub(super) fn refresh_plugin(&mut self) {
        if self.plugins.generation() != self.generation {
            if self.follows() {
                // The owner runs the plugin; a follower only shows which.
                self.generation = self.plugins.generation();
            } else {
                self.switch_plugin();
            }
            self.show_logic();
        }
    }

    pub(super) fn switch_plugin(&mut self) {
        let generation = self.plugins.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let wanted = self.plugins.for_room(&self.room.name);
        let current = match &self.logic {
            Logic::Default => None,
            Logic::Plugin { instance, .. } => Some(instance.plugin().clone()),
            Logic::Failed { plugin } => Some(plugin.clone()),
        };
        let same = match (&wanted, &current) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        // Carry the room's state over when the old version can snapshot.
        let state = match &mut self.logic {
            Logic::Plugin { instance, calls } if wanted.is_some() => match instance.snapshot() {
                Ok(state) => {
                    calls.ok();
                    state
                }
                Err(error) => {
                    self.failed_call(&error);
                    None
                }
            },
            _ => None,
        };
        self.timers.clear();
        match wanted {
            None => {
                if let Some(old) = current {
                    tracing::info!(room = %self.room.name, plugin = old.name(), "room returns to the default behaviour");
                }
                self.logic = Logic::Default;
            }
            Some(plugin) => {
                match &current {
                    // A reload (or a new plugin claiming the room) changed what serves it.
                    Some(old) => tracing::info!(
                        room = %self.room.name,
                        plugin = plugin.name(),
                        from = %format!("{} {}", old.name(), old.info().version),
                        to = %format!("{} {}", plugin.name(), plugin.info().version),
                        sha256 = plugin.sha256(),
                        "room switches plugin"
                    ),
                    // A new room starting on its plugin: routine.
                    None => {
                        tracing::debug!(room = %self.room.name, plugin = plugin.name(), "room starts its plugin")
                    }
                }
                self.start(plugin, state);
            }
        }
    }

    /// Start a fresh instance of `plugin`. With `state`, restore it; without (or if the
    /// restore is refused), present the current members as joins. Returns whether the
    /// state was restored.
    pub(super) fn start(&mut self, plugin: Arc<Plugin>, state: Option<Vec<u8>>) -> bool {
        let calls = self.metrics.plugin_calls(plugin.name());
        let mut instance = match plugin.instantiate(&self.room.name) {
            Ok(instance) => instance,
            Err(error) => {
                calls.count(error.kind.outcome());
                tracing::error!(%error, "plugin instance could not start; closing the room's members");
                self.logic = Logic::Failed { plugin };
                self.close_all_failed();
                return false;
            }
        };
        calls.ok();
        let mut restored = false;
        if let Some(state) = state {
            match instance.restore(&state) {
                Ok(()) => {
                    calls.ok();
                    restored = true;
                }
                Err(error) => {
                    calls.count(error.kind.outcome());
                    tracing::warn!(%error, "restore refused; the room starts fresh");
                    if instance.failure().is_some() {
                        match plugin.instantiate(&self.room.name) {
                            Ok(fresh) => instance = fresh,
                            Err(error) => {
                                tracing::error!(%error, "plugin instance could not start");
                                self.logic = Logic::Failed { plugin };
                                self.close_all_failed();
                                return false;
                            }
                        }
                    }
                }
            }
        }
        self.logic = Logic::Plugin { instance, calls };
        self.apply_setup();
        if !restored {
            for member in self.member_infos() {
                if self.call_join(&member) == Admission::Failed {
                    return false;
                }
            }
        }
        restored
    }

    /// Apply the timers a new instance set in `init` or `restore`.
    pub(super) fn apply_setup(&mut self) {
        if let Logic::Plugin { instance, .. } = &mut self.logic {
            let actions = instance.take_setup_actions();
            self.apply(actions, 0);
        }
    }

    /// Run `call` on the plugin instance, counting its outcome; `None` when the room
    /// has no live instance.
    pub(super) fn with_instance<T>(
        &mut self,
        call: impl FnOnce(&mut RoomInstance, &RoomView<'_>) -> Result<T, PluginError>,
    ) -> Option<Result<T, PluginError>> {
        let Logic::Plugin { instance, calls } = &mut self.logic else {
            return None;
        };
        let view = RoomView { room: &self.room.name, members: &self.ids, room_exists: &self.room_exists };
        let result = call(instance, &view);
        match &result {
            Ok(_) => calls.ok(),
            Err(error) => calls.count(error.kind.outcome()),
        }
        Some(result)
    }

    pub(super) fn failed_call(&self, error: &PluginError) {
        tracing::warn!(plugin = %error.plugin, room = %self.room.name, outcome = error.kind.outcome(), %error, "plugin call failed");
    }

    /// After a failed call: the instance is gone; the room continues on a fresh one,
    /// which is told about every current member. If that fails too, the members are
    /// closed with 1011.
    pub(super) fn recover(&mut self, error: &PluginError) {
        self.flush_staged();
        self.failed_call(error);
        let Logic::Plugin { instance, .. } = &self.logic else {
            return;
        };
        let plugin = instance.plugin().clone();
        self.timers.clear();
        self.logic = Logic::Default;
        let attempt = plugin.instantiate(&self.room.name);
        let calls = self.metrics.plugin_calls(plugin.name());
        match attempt {
            Ok(instance) => {
                calls.ok();
                tracing::info!(room = %self.room.name, plugin = plugin.name(), "room continues on a fresh plugin instance");
                self.logic = Logic::Plugin { instance, calls };
                self.apply_setup();
                for info in self.member_infos() {
                    match self.with_instance(|instance, view| instance.join(view, &info)) {
                        Some(Ok((Ok(()), actions))) => self.apply(actions, 0),
                        Some(Ok((Err(refused), actions))) => {
                            self.refuse(info.id, &refused);
                            self.apply(actions, 0);
                        }
                        Some(Err(error)) => {
                            self.failed_call(&error);
                            self.logic = Logic::Failed { plugin };
                            self.close_all_failed();
                            return;
                        }
                        None => {}
                    }
                }
            }
            Err(error) => {
                calls.count(error.kind.outcome());
                self.failed_call(&error);
                self.logic = Logic::Failed { plugin };
                self.close_all_failed();
            }
        }
    }

    pub(super) fn close_all_failed(&mut self) {
        let local: Vec<MemberId> = self.peers.iter().map(|p| p.id).collect();
        for member in local {
            self.close_member(member, CloseReason::PluginFailure, close_code::INTERNAL, "plugin failure");
        }
        if let Some(clustered) = &mut self.cluster {
            for &member in clustered.remote.keys() {
                clustered.outbox.push(Delivery::Close {
                    member,
                    code: close_code::INTERNAL,
                    reason: "plugin failure".into(),
                    failure: true,
                });
            }
        }
    }

    /// Carry out what a successful call asked for.
    pub(super) fn apply(&mut self, actions: Vec<Action>, hops: u8) {
        for action in actions {
            match action {
                Action::Send { to, payload } => {
                    if !self.deliver_to(to, &payload)
                        && let Some(clustered) = self.cluster.as_mut().filter(|c| c.remote.contains_key(&to))
                    {
                        clustered.outbox.push(Delivery::Send { to, payload });
                    }
                }
                Action::Broadcast { payload, except } => self.broadcast(&payload, &except),
                Action::Forward { room, payload } => self.forward(&room, payload, hops),
                Action::Close { member, code, reason } => {
                    // What the member was sent before its close reaches it first.
                    self.flush_staged();
                    if self.local(member).is_some() {
                        self.close_member(member, CloseReason::Plugin, code, &reason);
                    } else if let Some(clustered) =
                        self.cluster.as_mut().filter(|c| c.remote.contains_key(&member))
                    {
                        clustered.outbox.push(Delivery::Close { member, code, reason, failure: false });
                    }
                }
                Action::Remove { member, reason } => {
                    self.flush_staged();
                    let code = close_code::NORMAL;
                    if self.local(member).is_some() {
                        self.close_member(member, CloseReason::Plugin, code, &reason);
                    } else if let Some(clustered) =
                        self.cluster.as_mut().filter(|c| c.remote.contains_key(&member))
                    {
                        clustered.outbox.push(Delivery::Close { member, code, reason, failure: false });
                    }
                }
                Action::AddToRoom { member, room, params } => {
                    // What the member was sent before comes first.
                    self.flush_staged();
                    if self.local(member).is_some() {
                        self.invite(member, room, params);
                    } else if let Some(clustered) =
                        self.cluster.as_mut().filter(|c| c.remote.contains_key(&member))
                    {
                        clustered.outbox.push(Delivery::Invite { member, room, params });
                    }
                }
                Action::SetTimer { id, after } => {
                    self.timers.set(id, Instant::now() + after);
                }
                Action::CancelTimer { id } => {
                    self.timers.cancel(id);
                }
            }
        }
    }

    /// Ask this node's member `member` to join `room` (a plugin's `add-to-room`); a
    /// raw member, in one room by design, stays where it is.
    pub(super) fn invite(&self, member: MemberId, room: String, params: Option<String>) {
        let Some(peer) = self.local(member) else { return };
        if !peer.tagged {
            tracing::debug!(room = %self.room.name, member, target = %room, "add-to-room ignored: a raw connection is in one room");
            return;
        }
        peer.invite(Invite { room, params: params.map(Arc::from) });
    }

    pub(super) fn forward(&self, target: &str, payload: Payload, hops: u8) {
        let hops = hops.saturating_add(1);
        if hops > MAX_FORWARD_HOPS {
            tracing::debug!(from = %self.room.name, to = target, "forward dropped after {MAX_FORWARD_HOPS} hops");
            return;
        }
        let Some(room) = self.rooms.upgrade().and_then(|rooms| rooms.get(target)) else {
            // Not live here: its owner is elsewhere in the cluster, if anywhere.
            if let Some(clustered) = self.cluster.as_ref().filter(|c| c.role != Role::Solo) {
                let event = InEvent::Forward { from_room: self.room.name.to_string(), payload, hops };
                clustered.link.forward(target, event);
            }
            return;
        };
        let event = RoomEvent::Forward { from_room: self.room.name.clone(), payload, hops };
        // Never wait on another room: a full inbox drops the forward.
        if !room.try_send(event) {
            tracing::warn!(from = %self.room.name, to = target, "forward dropped: the target room is busy");
        }
    }
}
