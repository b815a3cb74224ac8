"""Gateway API mesh routes (GAMMA) and L7 policy → Envoy resources, as pure functions.

`translate(L7Input, previous_ports)` turns one node's view of the cluster (services, pods,
HTTPRoutes/GRPCRoutes, L7 policy of pod ports) into a `Translation`: the Envoy
listeners, route configurations, clusters and endpoints (one content-hash version), the
redirect entries for the BPF maps, and every route's ``status``. `with_nack` folds an Envoy
NACK into a route status; `validate.envoy_validate` checks a snapshot with
``envoy --mode validate``; `validate.check_regex` checks one regular expression.

Modules: `inputs` (input types), `attach` (parents, backends, statuses), `matching` (matches and
precedence), `actions` (filters, timeouts, retries), `rbac` (L7 policy), `resources` (Envoy
resource shapes), `ports` (listener ports), `status`, `snapshot` (output types), `translate`,
`validate`. docs/routes.md maps every Gateway API field to Envoy.
"""

from nodemesh.route.inputs import (
    ANY_IDENTITY,
    CONTROLLER_NAME,
    FIRST_LISTENER_PORT,
    PROXY_IP,
    L7Input,
    L7Policy,
    L7PolicyRule,
    Pod,
    RedirectKey,
    RouteKey,
    Service,
    ServicePort,
    l7_policies_from_compiled,
)
from nodemesh.route.ports import PortsExhausted, allocate_listener_ports
from nodemesh.route.snapshot import EnvoyResources, Translation
from nodemesh.route.status import stamp_transition_times, with_nack
from nodemesh.route.translate import translate

__all__ = [
    "ANY_IDENTITY",
    "CONTROLLER_NAME",
    "FIRST_LISTENER_PORT",
    "PROXY_IP",
    "EnvoyResources",
    "L7Input",
    "L7Policy",
    "L7PolicyRule",
    "Pod",
    "PortsExhausted",
    "RedirectKey",
    "RouteKey",
    "Service",
    "ServicePort",
    "Translation",
    "allocate_listener_ports",
    "l7_policies_from_compiled",
    "stamp_transition_times",
    "translate",
    "with_nack",
]
