//! Virtual networks: a name, a UUID and private routes. A device belongs to at most one; its
//! flows to a route's CIDR leave through the route's interface instead of to the Internet, so two
//! networks may reach the same private range at two different sites.

use ipnet::IpNet;
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{check_label, new_uuid, Device, Registry, RegistryError};
use waygate_config::route_via;

/// A private route of a virtual network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnetRoute {
    /// Destinations it covers.
    pub cidr: IpNet,
    /// The gateway's interface towards the site, or the address of the router to send to.
    pub via: String,
}

impl VnetRoute {
    /// Parses `CIDR=INTERFACE` or `CIDR=NEXT_HOP` (an address of the range's family).
    pub fn parse(text: &str) -> Result<VnetRoute, RegistryError> {
        let bad = || RegistryError::InvalidRoute(text.to_string());
        let (cidr, via) = text.split_once('=').ok_or_else(bad)?;
        let cidr: IpNet = cidr.trim().parse().map_err(|_| bad())?;
        // The config accepts the same routes, so the rule lives there, below the registry.
        let via = route_via(cidr, via).ok_or_else(bad)?;
        Ok(VnetRoute {
            cidr: cidr.trunc(),
            via,
        })
    }

    /// The router this route sends to, when it names one instead of an interface.
    pub fn next_hop(&self) -> Option<std::net::IpAddr> {
        self.via.parse().ok()
    }
}

/// A virtual network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vnet {
    /// Random UUID (v4).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Private routes.
    pub routes: Vec<VnetRoute>,
    /// Creation time (unix seconds).
    pub created_at: i64,
}

/// Ids compare without dashes and case, as Cloudflare's API and dashboard spell them differently.
fn same_id(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    };
    norm(a) == norm(b)
}

impl Registry {
    /// Creates a virtual network.
    pub fn create_vnet(
        &self,
        name: &str,
        routes: &[VnetRoute],
        now_unix: i64,
    ) -> Result<Vnet, RegistryError> {
        check_label("virtual network name", name)?;
        let tx = self.write_tx()?;
        let taken: Option<String> = tx
            .query_row("SELECT id FROM vnets WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        if taken.is_some() {
            return Err(RegistryError::VnetNameTaken(name.to_string()));
        }
        let id = new_uuid(&mut rand::rngs::OsRng);
        tx.execute(
            "INSERT INTO vnets (id, name, created_at) VALUES (?1, ?2, ?3)",
            params![id, name, now_unix],
        )?;
        let mut unique: Vec<VnetRoute> = Vec::new();
        for route in routes {
            if unique.iter().any(|r| r.cidr == route.cidr) {
                return Err(RegistryError::InvalidRoute(format!(
                    "{}={} (a second route for {})",
                    route.cidr, route.via, route.cidr
                )));
            }
            unique.push(route.clone());
        }
        {
            let mut insert =
                tx.prepare("INSERT INTO vnet_routes (vnet_id, cidr, via) VALUES (?1, ?2, ?3)")?;
            for route in &unique {
                insert.execute(params![id, route.cidr.to_string(), route.via])?;
            }
        }
        tx.commit()?;
        Ok(Vnet {
            id,
            name: name.to_string(),
            routes: unique,
            created_at: now_unix,
        })
    }

    /// Makes the registry hold the virtual network `id` with this name and exactly these
    /// routes (the config's `[[vnets]]`), creating it when missing.
    pub fn upsert_vnet(
        &self,
        id: &str,
        name: &str,
        routes: &[VnetRoute],
        now_unix: i64,
    ) -> Result<(), RegistryError> {
        check_label("virtual network name", name)?;
        let tx = self.write_tx()?;
        let holder: Option<String> = tx
            .query_row("SELECT id FROM vnets WHERE name = ?1", [name], |r| r.get(0))
            .optional()?;
        if holder.is_some_and(|h| !same_id(&h, id)) {
            return Err(RegistryError::VnetNameTaken(name.to_string()));
        }
        let current: Vec<VnetRoute> = match self.vnets()?.into_iter().find(|v| same_id(&v.id, id)) {
            Some(v) if v.name == name && v.routes == routes => return Ok(()),
            Some(v) => v.routes,
            None => {
                tx.execute(
                    "INSERT INTO vnets (id, name, created_at) VALUES (?1, ?2, ?3)",
                    params![id, name, now_unix],
                )?;
                Vec::new()
            }
        };
        tx.execute(
            "UPDATE vnets SET name = ?2 WHERE id = ?1 AND name != ?2",
            params![id, name],
        )?;
        if current != routes {
            tx.execute("DELETE FROM vnet_routes WHERE vnet_id = ?1", [id])?;
            let mut insert =
                tx.prepare("INSERT INTO vnet_routes (vnet_id, cidr, via) VALUES (?1, ?2, ?3)")?;
            for route in routes {
                insert.execute(params![id, route.cidr.to_string(), route.via])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every virtual network, oldest first.
    pub fn vnets(&self) -> Result<Vec<Vnet>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, name, created_at FROM vnets ORDER BY created_at, rowid")?;
        let mut vnets = stmt
            .query_map([], |r| {
                Ok(Vnet {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    routes: Vec::new(),
                    created_at: r.get(2)?,
                })
            })?
            .collect::<Result<Vec<Vnet>, _>>()?;
        let mut routes = self
            .conn
            .prepare("SELECT vnet_id, cidr, via FROM vnet_routes ORDER BY rowid")?;
        let mut rows = routes.query([])?;
        while let Some(r) = rows.next()? {
            let vnet_id: String = r.get(0)?;
            let cidr: String = r.get(1)?;
            let via: String = r.get(2)?;
            let cidr: IpNet = cidr.parse().map_err(|_| RegistryError::Corrupt {
                id: vnet_id.clone(),
                column: "cidr",
                value: cidr.clone(),
            })?;
            if let Some(v) = vnets.iter_mut().find(|v| v.id == vnet_id) {
                v.routes.push(VnetRoute { cidr, via });
            }
        }
        Ok(vnets)
    }

    /// The virtual network whose id (with or without dashes) or name is `needle`.
    pub fn find_vnet(&self, needle: &str) -> Result<Vnet, RegistryError> {
        self.vnets()?
            .into_iter()
            .find(|v| v.name == needle || same_id(&v.id, needle))
            .ok_or_else(|| RegistryError::VnetNotFound(needle.to_string()))
    }

    /// Deletes a virtual network no active device belongs to.
    pub fn delete_vnet(&self, needle: &str) -> Result<Vnet, RegistryError> {
        let tx = self.write_tx()?;
        let vnet = self.find_vnet(needle)?;
        let members: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT name FROM devices WHERE vnet_id = ?1 AND revoked_at IS NULL ORDER BY rowid",
            )?;
            let names = stmt
                .query_map([&vnet.id], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            names
        };
        if !members.is_empty() {
            return Err(RegistryError::VnetInUse {
                name: vnet.name,
                devices: members,
            });
        }
        tx.execute("DELETE FROM vnets WHERE id = ?1", [&vnet.id])?;
        tx.commit()?;
        Ok(vnet)
    }

    /// Moves a device into a virtual network (`None`: the default network, Internet only).
    pub fn set_device_vnet(
        &self,
        device: &str,
        vnet: Option<&str>,
    ) -> Result<Device, RegistryError> {
        let tx = self.write_tx()?;
        let mut found = self.find(device)?;
        let vnet_id = match vnet {
            Some(needle) => Some(self.find_vnet(needle)?.id),
            None => None,
        };
        tx.execute(
            "UPDATE devices SET vnet_id = ?2 WHERE id = ?1",
            params![found.id, vnet_id],
        )?;
        tx.commit()?;
        found.vnet_id = vnet_id;
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NewDevice;
    use waygate_config::TunnelConfig;

    fn registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(dir.path(), &waygate_config::Config::default().tunnel).unwrap();
        let _: &TunnelConfig = &reg.tunnel;
        (dir, reg)
    }

    fn enroll(reg: &Registry, name: &str, vnet: Option<String>) -> Device {
        let key = waygate_keys::PrivateKey::generate(&mut rand::rngs::OsRng).public_key();
        reg.enroll(
            NewDevice {
                name: Some(name.into()),
                email: format!("{name}@example.com"),
                user_name: None,
                groups: vec![],
                attributes: vec![],
                vnet_id: vnet,
                public_key: key,
            },
            1,
        )
        .unwrap()
    }

    #[test]
    fn routes_parse_and_bad_ones_are_refused() {
        let r = VnetRoute::parse("198.18.0.0/16=site-a").unwrap();
        assert_eq!(r.cidr.to_string(), "198.18.0.0/16");
        assert_eq!(r.via, "site-a");
        assert_eq!(r.next_hop(), None);
        let r = VnetRoute::parse("198.18.0.0/16=198.19.1.2").unwrap();
        assert_eq!(r.next_hop(), Some("198.19.1.2".parse().unwrap()));
        assert_eq!(
            VnetRoute::parse("198.18.1.7/16=x")
                .unwrap()
                .cidr
                .to_string(),
            "198.18.0.0/16"
        );
        for bad in [
            "198.18.0.0/16",
            "198.18.0.0/33=a",
            "198.18.0.0/16=",
            "198.18.0.0/16=2001:db8::1",
            "198.18.0.0/16=0.0.0.0",
            "198.18.0.0/16=a-very-long-interface",
            "198.18.0.0/16=a/b",
        ] {
            assert!(VnetRoute::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vnets_are_created_found_listed_and_deleted() {
        let (_dir, reg) = registry();
        let before = reg.change_counter().unwrap();
        let routes = [VnetRoute::parse("198.18.0.0/16=site-a").unwrap()];
        let a = reg.create_vnet("site-a", &routes, 10).unwrap();
        assert!(reg.change_counter().unwrap() > before, "a server reloads");
        let b = reg.create_vnet("site-b", &[], 11).unwrap();
        assert_ne!(a.id, b.id);
        assert!(matches!(
            reg.create_vnet("site-a", &[], 12),
            Err(RegistryError::VnetNameTaken(_))
        ));
        assert_eq!(reg.find_vnet("site-a").unwrap(), a);
        assert_eq!(reg.find_vnet(&a.id.replace('-', "")).unwrap(), a);
        assert_eq!(reg.find_vnet(&a.id.to_uppercase()).unwrap(), a);
        assert_eq!(reg.vnets().unwrap(), vec![a.clone(), b.clone()]);
        reg.delete_vnet("site-b").unwrap();
        assert!(matches!(
            reg.find_vnet("site-b"),
            Err(RegistryError::VnetNotFound(_))
        ));
    }

    #[test]
    fn a_vnet_in_use_is_not_deleted_and_devices_move_between_vnets() {
        let (_dir, reg) = registry();
        let a = reg.create_vnet("a", &[], 1).unwrap();
        let laptop = enroll(&reg, "laptop", Some(a.id.clone()));
        let err = reg.delete_vnet("a").unwrap_err().to_string();
        assert!(err.contains("laptop"), "{err}");
        let moved = reg.set_device_vnet("laptop", None).unwrap();
        assert_eq!(moved.vnet_id, None);
        assert_eq!(reg.find(&laptop.id).unwrap().vnet_id, None);
        reg.set_device_vnet("laptop", Some("a")).unwrap();
        assert_eq!(reg.find("laptop").unwrap().vnet_id, Some(a.id.clone()));
        assert!(matches!(
            reg.set_device_vnet("laptop", Some("nope")),
            Err(RegistryError::VnetNotFound(_))
        ));
        reg.set_device_vnet("laptop", None).unwrap();
        reg.delete_vnet(&a.id).unwrap();
    }

    #[test]
    fn config_vnets_are_upserted() {
        let (_dir, reg) = registry();
        let id = "f70ff985-a4ef-4643-bbbc-4a0ed4fc8415";
        let routes = [VnetRoute::parse("198.18.0.0/16=sa").unwrap()];
        reg.upsert_vnet(id, "site-a", &routes, 1).unwrap();
        let counter = reg.change_counter().unwrap();
        reg.upsert_vnet(id, "site-a", &routes, 2).unwrap();
        assert_eq!(
            reg.change_counter().unwrap(),
            counter,
            "unchanged: no reload"
        );
        let moved = [VnetRoute::parse("198.18.0.0/15=sb").unwrap()];
        reg.upsert_vnet(id, "site-a2", &moved, 3).unwrap();
        let v = reg.find_vnet(id).unwrap();
        assert_eq!(
            (v.name.as_str(), v.routes.as_slice()),
            ("site-a2", &moved[..])
        );
        reg.create_vnet("taken", &[], 4).unwrap();
        assert!(matches!(
            reg.upsert_vnet(id, "taken", &moved, 5),
            Err(RegistryError::VnetNameTaken(_))
        ));
    }

    #[test]
    fn a_second_route_for_the_same_cidr_is_refused() {
        let (_dir, reg) = registry();
        let routes = [
            VnetRoute::parse("198.18.0.0/16=a").unwrap(),
            VnetRoute::parse("198.18.0.0/16=b").unwrap(),
        ];
        assert!(matches!(
            reg.create_vnet("x", &routes, 1),
            Err(RegistryError::InvalidRoute(_))
        ));
        assert!(reg.vnets().unwrap().is_empty(), "nothing half-created");
    }
}
