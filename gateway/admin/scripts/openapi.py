#!/usr/bin/env python3
"""Writes gateway/admin/openapi.json (the admin API's OpenAPI 3 document).

The document is kept in the repository and embedded in the binary; edit this generator and
run it (python3 gateway/admin/scripts/openapi.py) rather than the JSON by hand. A unit test
checks that every documented operation is routed."""
import json, os

def ref(name): return {"$ref": f"#/components/schemas/{name}"}
def arr(item): return {"type": "array", "items": item}
S = {"type": "string"}
NS = {"type": "string", "nullable": True}
I = {"type": "integer"}
B = {"type": "boolean"}
T = {"type": "string", "format": "date-time"}
# A name or id as the registry takes it: 1 to 128 characters, no control characters, no spaces
# around it.
LABEL = {"type": "string", "minLength": 1, "maxLength": 128,
         "pattern": "^[^\\x00-\\x20\\x7f-\\xa0]([^\\x00-\\x1f\\x7f-\\x9f]*[^\\x00-\\x20\\x7f-\\xa0])?$"}
NLABEL = {**LABEL, "nullable": True}
EMAIL = {"type": "string", "pattern": "^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)+$",
         "maxLength": 254}
KEY = {"type": "string", "nullable": True, "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$",
       "description": "The device's own key; without it the config carries a new private key."}

def envelope(result):
    return {"type": "object", "required": ["success", "errors", "messages", "result"],
            "properties": {"success": B, "errors": arr(ref("Error")), "messages": arr({}),
                           "result": result, "result_info": ref("ResultInfo")}}

def ok(result, desc="Success"):
    return {"description": desc, "content": {"application/json": {"schema": envelope(result)}}}

FAIL = {"description": "Failure", "content": {"application/json": {"schema": ref("Failure")}}}

def op(summary, result, body=None, errors=(400, 404, 409), tag=None):
    o = {"summary": summary, "tags": [tag] if tag else [],
         "responses": {"200": ok(result), **{str(e): FAIL for e in errors},
                       "401": FAIL, "403": FAIL, "500": FAIL}}
    if body:
        o["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return o

def param(name, desc):
    return [{"name": name, "in": "path", "required": True, "description": desc, "schema": S}]

schemas = {
    "Error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": I, "message": S,
        "field": {"type": "string", "description": "The field at fault (`traffic`, `items[2].value`, `body`)."},
        "line": {"type": "integer", "description": "1-based line inside the expression or body."},
        "column": {"type": "integer", "description": "1-based column inside the expression or body."}}},
    "ResultInfo": {"type": "object", "properties": {"page": I, "per_page": I, "count": I, "total_count": I}},
    "Failure": {"type": "object", "required": ["success", "errors", "messages", "result"], "properties": {
        "success": {"type": "boolean", "enum": [False]}, "errors": arr(ref("Error")),
        "messages": arr({}), "result": {"nullable": True}}},
    "RuleSettings": {"type": "object", "additionalProperties": True,
                     "description": "Cloudflare's rule_settings (block_page_enabled, override_ips, egress, ...)."},
    "RuleInput": {"type": "object", "required": ["action", "filters", "name"],
                  "description": "A rule as in a rules file. enabled defaults to true, precedence to one above the highest.",
                  "properties": {
        "name": LABEL, "description": NS, "action": {"type": "string", "description": "dns: allow, block, override, safesearch, ytrestricted; l4: allow, block, l4_override; http: allow, block, off, redirect, ...; egress: egress"},
        "enabled": B, "filters": {**arr({"type": "string", "enum": ["dns", "http", "l4", "egress"]}), "minItems": 1, "maxItems": 1},
        "precedence": I, "traffic": S, "identity": S, "device_posture": S,
        "rule_settings": ref("RuleSettings")}, "additionalProperties": True},
    "Rule": {"allOf": [ref("RuleInput"), {"type": "object", "required": ["id"], "properties": {
        "id": S, "created_at": T, "updated_at": T, "version": I}}]},
    "Deleted": {"type": "object", "required": ["id"], "properties": {"id": S}},
    "ListItem": {"type": "object", "required": ["value"], "properties": {"value": S, "description": NS, "created_at": T}},
    "ListItemInput": {"type": "object", "required": ["value"], "properties": {"value": S, "description": NS}},
    "ListType": {"type": "string", "enum": ["IP", "DOMAIN", "EMAIL", "URL", "SERIAL"]},
    "List": {"type": "object", "required": ["id", "name", "type", "count"], "properties": {
        "id": S, "name": S, "description": NS, "type": ref("ListType"), "count": I,
        "created_at": T, "updated_at": T, "items": arr(ref("ListItem"))}},
    "ListInput": {"type": "object", "required": ["name", "type"], "properties": {
        "name": LABEL, "type": ref("ListType"), "description": NS, "items": arr(ref("ListItemInput"))}},
    "ListReplace": {"type": "object", "description": "A name or type absent or null keeps the list's; items replace all items.", "properties": {
        "name": NLABEL, "type": {"allOf": [ref("ListType")], "nullable": True}, "description": NS, "items": arr(ref("ListItemInput"))}},
    "ListPatch": {"type": "object", "properties": {
        "append": arr(ref("ListItemInput")), "remove": arr(S)}},
    "Device": {"type": "object", "required": ["id", "name", "public_key", "ipv4", "ipv6", "email"], "properties": {
        "id": S, "name": S, "public_key": S, "ipv4": S, "ipv6": S, "email": S, "user_name": NS,
        "groups": arr(S), "vnet_id": NS, "created_at": I, "last_seen": {"type": "integer", "nullable": True},
        "last_endpoint": NS, "revoked_at": {"type": "integer", "nullable": True},
        "group_ids": arr(S), "group_emails": arr(S), "attributes": arr(S),
        "posture_passed": arr(S), "posture_failed": arr(S)}},
    "EnrollRequest": {"type": "object", "required": ["email"], "additionalProperties": False, "properties": {
        "email": EMAIL, "name": {"type": "string", "nullable": True, "pattern": "^[A-Za-z0-9._-]{1,64}$"},
        "user_name": NLABEL, "groups": arr(LABEL),
        "attributes": arr({"type": "string", "pattern": "^[A-Za-z0-9._-]+=[A-Za-z0-9._-]+$", "description": "NAME=VALUE"}),
        "vnet": NLABEL, "public_key": KEY}},
    "Enrolled": {"type": "object", "required": ["device", "wg_quick", "endpoint"], "properties": {
        "device": ref("Device"), "wg_quick": S, "endpoint": S, "endpoint_derived": B}},
    "SetVnet": {"type": "object", "additionalProperties": False, "properties": {"vnet": NS}},
    "Posture": {"type": "object", "additionalProperties": False, "properties": {"passed": arr(LABEL), "failed": arr(LABEL)}},
    "PostureRuleInput": {"type": "object", "required": ["name", "type", "input"], "additionalProperties": False,
        "description": "A device posture rule in Cloudflare's shape; `id` is kept when given. Types a Linux client "
                       "checks: file, application, os_version, disk_encryption, serial_number, client_certificate_v2, and Waygate's own client_version.",
        "properties": {
            "id": LABEL, "name": LABEL, "description": S,
            "type": {"type": "string", "enum": ["file", "application", "os_version", "disk_encryption",
                                                "serial_number", "client_version", "client_certificate_v2"]},
            "schedule": {"type": "string", "pattern": "^[0-9]+[smhd]$", "description": "How often clients check (default 5m, at least 1m)."},
            "expiration": {"type": "string", "pattern": "^([0-9]+[smhd])?$",
                           "description": "How long a result stays valid; empty: twice the schedule plus 60 s."},
            "match": arr({"type": "object", "required": ["platform"], "additionalProperties": False, "properties": {
                "platform": {"type": "string", "enum": ["windows", "mac", "linux", "android", "ios", "chromeos"]}}}),
            "input": {"type": "object", "additionalProperties": True,
                      "description": "file {path, exists, sha256}; application {path, sha256}; os_version {version, operator, "
                                     "os_distro_name, os_distro_revision}; disk_encryption {check_disks, require_all}; "
                                     "serial_number {id}; client_version {version, operator}; client_certificate_v2 {certificate_id, cn, "
                                     "extended_key_usage, locations: {paths}}."}}},
    "PostureRule": {"type": "object", "required": ["id", "name", "type", "schedule", "expiration", "match", "input"], "properties": {
        "id": S, "name": S, "description": S, "type": S, "schedule": S, "expiration": S,
        "match": arr({"type": "object", "properties": {"platform": S}}), "input": {"type": "object"}}},
    "PostureResult": {"type": "object", "required": ["check_id", "passed", "reported_at"], "properties": {
        "check_id": S, "passed": B, "reported_at": I, "expires_at": {"type": "integer", "nullable": True},
        "reason": NS}},
    "DeletedPostureRule": {"type": "object", "required": ["id"], "properties": {"id": S}},
    "User": {"type": "object", "required": ["id", "email"], "properties": {
        "id": {"type": "string", "format": "uuid",
               "description": "A UUID derived from the email: the same on every gateway, the activity logs' UserID."},
        "email": S, "name": NS, "groups": arr(S), "devices": I}},
    "Group": {"type": "object", "required": ["id", "name"], "properties": {
        "id": S, "name": S, "email": NS, "created_at": I}},
    "NewGroup": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": LABEL, "email": {**EMAIL, "nullable": True}, "id": NLABEL}},
    "Vnet": {"type": "object", "required": ["id", "name", "routes"], "properties": {
        "id": S, "name": S, "created_at": I,
        "routes": arr({"type": "object", "properties": {"cidr": S, "via": S}})}},
    "NewVnet": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": LABEL, "routes": arr({"type": "string", "description": "CIDR=INTERFACE or CIDR=NEXT_HOP"})}},
    "Status": {"type": "object", "required": ["version", "uptime_seconds", "peers", "flows", "rules_loaded"], "properties": {
        "version": S, "uptime_seconds": I, "peers": I,
        "flows": {"type": "object", "properties": {"tcp": I, "udp": I, "total": I}},
        "rules_loaded": I, "rules_stored": I, "policy_source": {"type": "object"}}},
}

R = ref
paths = {
    "/status": {"get": op("The gateway's version, uptime, peers, flows and rules loaded", R("Status"), errors=(), tag="status")},
    "/openapi.json": {"get": {"summary": "This document", "tags": ["status"], "security": [],
                              "responses": {"200": {"description": "The OpenAPI document", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    "/gateway/rules": {
        "get": op("List rules (by precedence)", arr(R("Rule")), errors=(409,), tag="rules"),
        "post": op("Create a rule; its expressions come back in canonical form", R("Rule"), R("RuleInput"), tag="rules")},
    "/gateway/rules/{rule_id}": {
        "parameters": param("rule_id", "The rule's id."),
        "get": op("Get a rule", R("Rule"), errors=(404,), tag="rules"),
        "put": op("Replace a rule", R("Rule"), R("RuleInput"), tag="rules"),
        "delete": op("Delete a rule", R("Deleted"), errors=(404, 409), tag="rules")},
    "/gateway/lists": {
        "get": op("List lists (without items)", arr(R("List")), errors=(409,), tag="lists"),
        "post": op("Create a list", R("List"), R("ListInput"), tag="lists")},
    "/gateway/lists/{list_id}": {
        "parameters": param("list_id", "The list's id or name."),
        "get": op("Get a list with its items", R("List"), errors=(404,), tag="lists"),
        "put": op("Replace a list's name, description and items", R("List"), R("ListReplace"), tag="lists"),
        "patch": op("Append and remove items", R("List"), R("ListPatch"), tag="lists"),
        "delete": op("Delete a list no rule uses", R("Deleted"), errors=(404, 409), tag="lists")},
    "/gateway/lists/{list_id}/items": {
        "parameters": param("list_id", "The list's id or name."),
        "get": op("A list's items", arr(R("ListItem")), errors=(404,), tag="lists")},
    "/devices": {
        "get": op("List devices (revoked ones too)", arr(R("Device")), errors=(), tag="devices"),
        "post": op("Enroll a device; the result holds its wg-quick config", R("Enrolled"), R("EnrollRequest"), tag="devices")},
    "/devices/posture": {
        "get": op("List device posture rules", arr(R("PostureRule")), errors=(), tag="posture"),
        "post": op("Create a device posture rule", R("PostureRule"), R("PostureRuleInput"), tag="posture")},
    "/devices/posture/{rule_id}": {
        "parameters": param("rule_id", "The posture rule's id."),
        "get": op("Get a device posture rule", R("PostureRule"), errors=(404,), tag="posture"),
        "put": op("Replace a device posture rule", R("PostureRule"), R("PostureRuleInput"), tag="posture"),
        "delete": op("Delete a device posture rule (devices' results for it expire)", R("DeletedPostureRule"), errors=(404,), tag="posture")},
    "/devices/{device}": {
        "parameters": param("device", "Id, name or public key (percent-encoded)."),
        "get": op("Get a device", R("Device"), errors=(404,), tag="devices"),
        "delete": op("Revoke a device; its traffic stops within a second", R("Device"), errors=(404, 409), tag="devices")},
    "/devices/{device}/vnet": {
        "parameters": param("device", "Id, name or public key (percent-encoded)."),
        "put": op("Move a device into a virtual network (null: the default one)", R("Device"), R("SetVnet"), tag="devices")},
    "/devices/{device}/posture": {
        "parameters": param("device", "Id, name or public key (percent-encoded)."),
        "get": op("A device's posture results: verdict, reason, when reported and when a pass expires", arr(R("PostureResult")), errors=(404,), tag="devices"),
        "put": op("Replace a device's posture-check results", R("Device"), R("Posture"), tag="devices")},
    "/users": {"get": op("Users with active devices", arr(R("User")), errors=(), tag="users")},
    "/groups": {
        "get": op("List groups", arr(R("Group")), errors=(), tag="users"),
        "post": op("Create a group", R("Group"), R("NewGroup"), tag="users")},
    "/groups/{group}": {
        "parameters": param("group", "Id or name."),
        "delete": op("Delete a group (devices keep its name)", R("Group"), errors=(404,), tag="users")},
    "/virtual_networks": {
        "get": op("List virtual networks", arr(R("Vnet")), errors=(), tag="virtual_networks"),
        "post": op("Create a virtual network", R("Vnet"), R("NewVnet"), tag="virtual_networks")},
    "/virtual_networks/{vnet}": {
        "parameters": param("vnet", "Id or name."),
        "delete": op("Delete a virtual network no device is in", R("Vnet"), errors=(404, 409), tag="virtual_networks")},
}

doc = {
    "openapi": "3.0.3",
    "info": {"title": "Waygate admin API", "version": "0.1.0",
             "description": "Cloudflare Gateway-shaped admin API of a Waygate gateway. Served on "
             "<data_dir>/admin.sock (mode 0600, no token) and, with [admin] listen, on TLS with "
             "`Authorization: Bearer TOKEN` (`waygate admin token create [--read-only]`). Every answer "
             "but this document is the envelope {success, errors, messages, result, result_info?}. "
             "Rules and lists are read-only here (409) when the config names policy.rules / policy.lists."},
    "servers": [{"url": "https://localhost:8443"}],
    "security": [{"bearer": []}],
    "paths": paths,
    "components": {"schemas": schemas,
                   "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
}
out = os.path.join(os.path.dirname(__file__), "..", "openapi.json")
with open(out, "w") as f:
    json.dump(doc, f, indent=2)
    f.write("\n")
