//! The operations on devices, users, groups and virtual networks, behind one trait with two
//! implementations: [`Local`] works on the registry (the admin API's handlers, and the CLI when
//! no gateway runs), the admin crate's client sends them to a running gateway's API. The CLI
//! prints what either returns with the same code, so its output does not depend on the path.

use serde::{Deserialize, Serialize};
use waygate_config::Config;
use waygate_registry::{Device, Group, PostureResult, Registry, Vnet, VnetRoute};

use crate::{ControlError, EnrollRequest, Enrolled};

/// What creating a group asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewGroup {
    /// Its name.
    pub name: String,
    /// Its email.
    pub email: Option<String>,
    /// Its id (default: a new UUID).
    pub id: Option<String>,
}

/// What creating a virtual network asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewVnet {
    /// Its name.
    pub name: String,
    /// Private routes, `CIDR=INTERFACE` or `CIDR=NEXT_HOP`.
    pub routes: Vec<String>,
}

/// A device's posture results (replacing the previous ones).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Posture {
    /// Checks passed.
    pub passed: Vec<String>,
    /// Checks failed.
    pub failed: Vec<String>,
}

/// Which virtual network a device moves into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SetVnet {
    /// Name or id; `None`: the default network.
    pub vnet: Option<String>,
}

/// A user: the people devices are enrolled for, by email.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user's id: a UUID derived from the email ([`waygate_model::user_id`]), as the
    /// activity logs' `UserID` shows it.
    pub id: String,
    /// The user's email.
    pub email: String,
    /// Their display name, as their newest device has it.
    pub name: Option<String>,
    /// Their groups, over all their devices.
    pub groups: Vec<String>,
    /// Their active devices.
    pub devices: usize,
}

/// The operations the CLI and the admin API share.
pub trait Admin {
    /// Every device, revoked ones included, oldest first.
    fn devices(&self) -> Result<Vec<Device>, ControlError>;
    /// The device with this id, name or public key.
    fn device(&self, needle: &str) -> Result<Device, ControlError>;
    /// Enrolls a device.
    fn enroll(&self, request: EnrollRequest) -> Result<Enrolled, ControlError>;
    /// Revokes a device.
    fn revoke(&self, needle: &str) -> Result<Device, ControlError>;
    /// Moves a device into a virtual network.
    fn set_vnet(&self, needle: &str, vnet: SetVnet) -> Result<Device, ControlError>;
    /// Replaces a device's posture results.
    fn set_posture(&self, needle: &str, posture: Posture) -> Result<Device, ControlError>;
    /// Every user with an active device.
    fn users(&self) -> Result<Vec<User>, ControlError>;
    /// Every group.
    fn groups(&self) -> Result<Vec<Group>, ControlError>;
    /// Creates a group.
    fn create_group(&self, group: NewGroup) -> Result<Group, ControlError>;
    /// Deletes a group.
    fn delete_group(&self, needle: &str) -> Result<Group, ControlError>;
    /// Every virtual network.
    fn vnets(&self) -> Result<Vec<Vnet>, ControlError>;
    /// Creates a virtual network.
    fn create_vnet(&self, vnet: NewVnet) -> Result<Vnet, ControlError>;
    /// Deletes a virtual network.
    fn delete_vnet(&self, needle: &str) -> Result<Vnet, ControlError>;
    /// A device's posture results as stored, with their reasons and expiry.
    fn posture_results(&self, needle: &str) -> Result<Vec<PostureResult>, ControlError>;
    /// Every device posture rule, in Cloudflare's JSON.
    fn posture_rules(&self) -> Result<Vec<serde_json::Value>, ControlError>;
    /// Creates a device posture rule from its JSON; returns it as stored.
    fn create_posture_rule(
        &self,
        rule: serde_json::Value,
    ) -> Result<serde_json::Value, ControlError>;
    /// Deletes a device posture rule.
    fn delete_posture_rule(&self, id: &str) -> Result<serde_json::Value, ControlError>;
}

/// The operations on a registry opened here, at one moment (`now`, unix seconds).
pub struct Local<'a> {
    /// The gateway's config (tunnel pools, endpoint, data dir).
    pub config: &'a Config,
    /// The open registry.
    pub registry: &'a Registry,
    /// The time written into what changes.
    pub now: i64,
}

/// The users behind these devices (active ones only), in order of their first device.
pub fn users_of(devices: &[Device]) -> Vec<User> {
    let mut users: Vec<User> = Vec::new();
    for d in devices.iter().filter(|d| d.is_active()) {
        let user = match users.iter_mut().position(|u| u.email == d.email) {
            Some(i) => &mut users[i],
            None => {
                users.push(User {
                    id: waygate_model::user_id(&d.email),
                    email: d.email.clone(),
                    name: None,
                    groups: Vec::new(),
                    devices: 0,
                });
                let last = users.len() - 1;
                &mut users[last]
            }
        };
        user.devices += 1;
        if d.user_name.is_some() {
            user.name.clone_from(&d.user_name);
        }
        for g in &d.groups {
            if !user.groups.contains(g) {
                user.groups.push(g.clone());
            }
        }
    }
    users
}

impl Admin for Local<'_> {
    fn devices(&self) -> Result<Vec<Device>, ControlError> {
        Ok(self.registry.all_devices()?)
    }

    fn device(&self, needle: &str) -> Result<Device, ControlError> {
        Ok(self.registry.find(needle)?)
    }

    fn enroll(&self, request: EnrollRequest) -> Result<Enrolled, ControlError> {
        crate::enroll(self.config, self.registry, request, self.now)
    }

    fn revoke(&self, needle: &str) -> Result<Device, ControlError> {
        Ok(self.registry.revoke(needle, self.now)?)
    }

    fn set_vnet(&self, needle: &str, vnet: SetVnet) -> Result<Device, ControlError> {
        Ok(self
            .registry
            .set_device_vnet(needle, vnet.vnet.as_deref())?)
    }

    fn set_posture(&self, needle: &str, posture: Posture) -> Result<Device, ControlError> {
        Ok(self
            .registry
            .set_posture(needle, &posture.passed, &posture.failed, self.now)?)
    }

    fn users(&self) -> Result<Vec<User>, ControlError> {
        Ok(users_of(&self.registry.all_devices()?))
    }

    fn groups(&self) -> Result<Vec<Group>, ControlError> {
        Ok(self.registry.groups()?)
    }

    fn create_group(&self, group: NewGroup) -> Result<Group, ControlError> {
        Ok(self.registry.create_group(
            &group.name,
            group.email.as_deref(),
            group.id.as_deref(),
            self.now,
        )?)
    }

    fn delete_group(&self, needle: &str) -> Result<Group, ControlError> {
        Ok(self.registry.delete_group(needle)?)
    }

    fn vnets(&self) -> Result<Vec<Vnet>, ControlError> {
        Ok(self.registry.vnets()?)
    }

    fn create_vnet(&self, vnet: NewVnet) -> Result<Vnet, ControlError> {
        let routes = vnet
            .routes
            .iter()
            .map(|r| VnetRoute::parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.registry.create_vnet(&vnet.name, &routes, self.now)?)
    }

    fn delete_vnet(&self, needle: &str) -> Result<Vnet, ControlError> {
        Ok(self.registry.delete_vnet(needle)?)
    }

    fn posture_results(&self, needle: &str) -> Result<Vec<PostureResult>, ControlError> {
        let device = self.registry.find(needle)?;
        Ok(self.registry.posture_results(&device.id)?)
    }

    fn posture_rules(&self) -> Result<Vec<serde_json::Value>, ControlError> {
        crate::posture::list(self.registry)
    }

    fn create_posture_rule(
        &self,
        rule: serde_json::Value,
    ) -> Result<serde_json::Value, ControlError> {
        crate::posture::create(
            self.config,
            self.registry,
            rule.to_string().as_bytes(),
            self.now,
        )
    }

    fn delete_posture_rule(&self, id: &str) -> Result<serde_json::Value, ControlError> {
        crate::posture::delete(self.registry, id)
    }
}
