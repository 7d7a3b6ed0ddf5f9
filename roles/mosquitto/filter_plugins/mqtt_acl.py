"""Filters of the mosquitto role's ACL template (templates/pihub.acl.j2)."""

from __future__ import annotations

from typing import Any

WRITES = ("write", "readwrite")


def mqtt_matches(topic: str, topic_filter: str) -> bool:
    """True if ``topic`` (no wildcards) matches the MQTT ``topic_filter`` (+ and #)."""
    levels, wanted = topic.split("/"), topic_filter.split("/")
    for index, part in enumerate(wanted):
        if part == "#":
            return True  # "a/#" matches "a" too, as in MQTT
        if index >= len(levels) or part not in ("+", levels[index]):
            return False
    return len(levels) == len(wanted)


def mosquitto_denied_topics(user: dict[str, Any], users: list[dict[str, Any]]) -> list[str]:
    """The exclusive topics of other users (an ``exclusive`` write grant without wildcards)
    that one of ``user``'s wider write grants would let it write: each gets a ``topic deny``
    line, which Mosquitto checks before any grant. A user that lists such a topic itself, as
    it is (no wildcard), keeps it: it may write it on purpose."""
    grants = [rule["topic"] for rule in user.get("acl") or []
              if rule.get("access", "readwrite") in WRITES]
    owned = sorted({rule["topic"] for other in users if other["name"] != user["name"]
                    for rule in other.get("acl") or []
                    if rule.get("exclusive") and rule.get("access", "readwrite") in WRITES
                    and not {"+", "#"} & set(rule["topic"].split("/"))})
    return [topic for topic in owned if topic not in grants
            and any(mqtt_matches(topic, grant) for grant in grants)]


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"mqtt_matches": mqtt_matches, "mosquitto_denied_topics": mosquitto_denied_topics}
