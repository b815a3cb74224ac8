"""Invalid manifests: each is refused with exactly the error lines a user should read."""

from __future__ import annotations

import textwrap

import pytest

from nodemesh.errors import InvalidManifest
from nodemesh.model.manifest import load_manifests
from nodemesh.model.validate import validate_objects

SERVICE = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
"""

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx
        ports:
        - name: http
          containerPort: 8080
"""

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo
  rules:
  - matches:
    - path:
        type: PathPrefix
        value: /api
    backendRefs:
    - name: echo-v1
      port: 8080
"""


SERVICE_ACCOUNT = """\
apiVersion: v1
kind: ServiceAccount
metadata:
  name: robot
"""

PEER_AUTH = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
"""

CNP_AUTH = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: c
spec:
  endpointSelector: {}
  ingress:
  - fromEndpoints:
    - {}
    authentication:
      mode: required
"""


def errors(text: str, source: str = "web.yaml", namespace: str = "default") -> list[str]:
    with pytest.raises(InvalidManifest) as e:
        validate_objects(load_manifests(textwrap.dedent(text), source), source, namespace)
    return e.value.errors


CASES: list[tuple[str, str, list[str]]] = [
    (
        "bad port",
        SERVICE.replace("port: 80", "port: 70000"),
        ["Service default/web: spec.ports[0].port: must be 1-65535"],
    ),
    (
        "port is a string",
        SERVICE.replace("port: 80", 'port: "80"'),
        ["Service default/web: spec.ports[0].port: must be an integer (got a string)"],
    ),
    (
        "deployment without selector",
        DEPLOYMENT.replace("  selector:\n    matchLabels:\n      app: web\n", ""),
        ["Deployment default/web: spec.selector: required"],
    ),
    (
        "deployment with an empty selector",
        DEPLOYMENT.replace("  selector:\n    matchLabels:\n      app: web\n", "  selector: {}\n"),
        ["Deployment default/web: spec.selector: must not be empty: a Deployment selects its "
         "pods by label"],
    ),
    (
        "unknown kind",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata:\n  name: web\n",
        ['web.yaml: document 1: kind: unknown kind "Ingress" (nodemesh accepts Namespace, Pod, '
         "Service, Deployment, ServiceAccount, NetworkPolicy, CiliumNetworkPolicy, "
         "PeerAuthentication, HTTPRoute, GRPCRoute, EndpointSlice)"],
    ),
    (
        "kind only nodemesh writes",
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n",
        ["web.yaml: document 1: kind: Node objects are written by nodemesh itself and cannot be "
         "applied"],
    ),
    (
        "unknown top-level field",
        SERVICE + "extra: true\n",
        ["Service default/web: extra: unknown field"],
    ),
    (
        "unknown nested field, with a suggestion",
        SERVICE.replace("    port: 80", "    port: 80\n    targetPrt: 8080"),
        ["Service default/web: spec.ports[0].targetPrt: unknown field "
         '(did you mean "targetPort"?)'],
    ),
    (
        "unknown field deep in a pod template",
        DEPLOYMENT.replace("containerPort: 8080", "containerPort: 8080\n          hostPorts: 1"),
        ["Deployment default/web: spec.template.spec.containers[0].ports[0].hostPorts: unknown "
         'field (did you mean "hostPort"?)'],
    ),
    (
        "duplicate name in one file",
        SERVICE + "---\n" + SERVICE,
        ['Service default/web: metadata.name: duplicate: Service "web" is already defined by '
         "web.yaml: document 1"],
    ),
    (
        "wrong apiVersion",
        SERVICE.replace("apiVersion: v1", "apiVersion: apps/v1"),
        ['Service default/web: apiVersion: must be "v1" for kind Service (got "apps/v1")'],
    ),
    (
        "missing apiVersion",
        DEPLOYMENT.replace("apiVersion: apps/v1\n", ""),
        ['Deployment default/web: apiVersion: required (must be "apps/v1" for kind Deployment)'],
    ),
    (
        "bad label key and value",
        SERVICE.replace("  name: web\n", "  name: web\n  labels:\n    app/x/y: a\n"
                        "    tier: -front\n    app.kubernetes.io/name: web\n"),
        ['Service default/web: metadata.labels["app/x/y"]: invalid label key: "app/x/y" has more '
         'than one "/": a label key is [prefix/]name',
         "Service default/web: metadata.labels[tier]: must be empty or a name of at most 63 "
         "characters of letters, digits, '-', '_' and '.', starting and ending with a letter or "
         "digit"],
    ),
    (
        "label value that YAML reads as a number",
        SERVICE.replace("    app: web", "    app: web\n    version: 2"),
        ['Service default/web: spec.selector[version]: must be a string (got an integer; write it '
         'in quotes: "2")'],
    ),
    (
        "service type LoadBalancer",
        SERVICE.replace("spec:\n", "spec:\n  type: LoadBalancer\n"),
        ["Service default/web: spec.type: LoadBalancer is not supported (nodemesh supports "
         "ClusterIP and headless services)"],
    ),
    (
        "SCTP service port",
        SERVICE.replace("    port: 80", "    port: 80\n    protocol: SCTP"),
        ["Service default/web: spec.ports[0].protocol: SCTP is not supported (nodemesh supports "
         "TCP and UDP)"],
    ),
    (
        "two unnamed service ports",
        SERVICE.replace("  - name: http\n    port: 80", "  - port: 80\n  - port: 81"),
        ["Service default/web: spec.ports[0].name: required when a Service has more than one port",
         "Service default/web: spec.ports[1].name: required when a Service has more than one port"],
    ),
    (
        "bad cilium lb-algorithm annotation",
        SERVICE.replace("  name: web\n", "  name: web\n  annotations:\n"
                        "    service.cilium.io/lb-algorithm: round-robin\n"),
        ['Service default/web: metadata.annotations["service.cilium.io/lb-algorithm"]: must be '
         '"random" or "maglev" (got "round-robin")'],
    ),
    (
        "selector does not match the template",
        DEPLOYMENT.replace("      labels:\n        app: web", "      labels:\n        app: api"),
        ["Deployment default/web: spec.template.metadata.labels: do not match spec.selector: the "
         "Deployment would not select its own pods"],
    ),
    (
        "container without a name",
        DEPLOYMENT.replace("      - name: web\n        image: nginx", "      - image: nginx"),
        ["Deployment default/web: spec.template.spec.containers[0].name: required"],
    ),
    (
        "duplicate container port names",
        DEPLOYMENT + "      - name: sidecar\n        image: busybox\n        ports:\n"
                     "        - name: http\n          containerPort: 9000\n",
        ['Deployment default/web: spec.template.spec.containers[1].ports[0].name: duplicate port '
         'name "http" (same as spec.template.spec.containers[0].ports[0].name)'],
    ),
    (
        "replicas -1",
        DEPLOYMENT.replace("spec:\n  selector", "spec:\n  replicas: -1\n  selector"),
        ["Deployment default/web: spec.replicas: must be >= 0"],
    ),
    (
        "deployment pods must restart Always",
        DEPLOYMENT.replace("      containers:",
                           "      restartPolicy: OnFailure\n      containers:"),
        ['Deployment default/web: spec.template.spec.restartPolicy: must be "Always" in a '
         'Deployment (got "OnFailure")'],
    ),
    (
        "pod volumes and hostNetwork",
        """\
        apiVersion: v1
        kind: Pod
        metadata:
          name: p
        spec:
          hostNetwork: true
          volumes:
          - name: data
            emptyDir: {}
          containers:
          - name: c
            image: busybox
        """,
        ["Pod default/p: spec.hostNetwork: not supported by nodemesh (every pod has a network "
         "namespace of its own)",
         "Pod default/p: spec.volumes: not supported by nodemesh (pods run as processes on the "
         "node's filesystem; there are no volumes)"],
    ),
    (
        "unsupported downward API field",
        DEPLOYMENT.replace("        image: nginx", "        image: nginx\n        env:\n"
                           "        - name: IPS\n          valueFrom:\n            fieldRef:\n"
                           "              fieldPath: status.podIPs"),
        ['Deployment default/web: spec.template.spec.containers[0].env[0].valueFrom.fieldRef.'
         'fieldPath: "status.podIPs" is not supported by nodemesh (supported: metadata.name, '
         "metadata.namespace, metadata.uid, spec.nodeName, spec.serviceAccountName, status.podIP, "
         "status.hostIP, metadata.labels['KEY'], metadata.annotations['KEY'])"],
    ),
    (
        "probe on a port the container does not declare",
        DEPLOYMENT.replace("        image: nginx", "        image: nginx\n        readinessProbe:\n"
                           "          httpGet:\n            port: admin"),
        ['Deployment default/web: spec.template.spec.containers[0].readinessProbe.httpGet.port: '
         'no port named "admin" in this container\'s ports'],
    ),
    (
        "endPort without a numeric port",
        """\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: np
        spec:
          podSelector: {}
          egress:
          - ports:
            - port: http
              endPort: 9000
            - endPort: 9000
        """,
        ['NetworkPolicy default/np: spec.egress[0].ports[0].endPort: may not be set when port is '
         'a name ("http")',
         "NetworkPolicy default/np: spec.egress[0].ports[1].endPort: may not be set without port"],
    ),
    (
        "endPort below port",
        """\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: np
        spec:
          podSelector: {}
          egress:
          - ports:
            - port: 9000
              endPort: 8000
        """,
        ["NetworkPolicy default/np: spec.egress[0].ports[0].endPort: must be >= port (9000)"],
    ),
    (
        "ipBlock except outside its cidr",
        """\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: np
        spec:
          podSelector: {}
          ingress:
          - from:
            - ipBlock:
                cidr: 10.0.0.0/16
                except:
                - 10.1.0.0/24
                - 10.0.0.0/16
        """,
        ['NetworkPolicy default/np: spec.ingress[0].from[0].ipBlock.except[0]: must be a strict '
         'subnet of cidr "10.0.0.0/16"',
         'NetworkPolicy default/np: spec.ingress[0].from[0].ipBlock.except[1]: must be a strict '
         'subnet of cidr "10.0.0.0/16"'],
    ),
    (
        "ipBlock combined with a selector",
        """\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata:
          name: np
        spec:
          podSelector: {}
          ingress:
          - from:
            - ipBlock:
                cidr: 10.0.0.0/16
              podSelector: {}
            - {}
        """,
        ["NetworkPolicy default/np: spec.ingress[0].from[0].ipBlock: may not be combined with "
         "podSelector or namespaceSelector",
         "NetworkPolicy default/np: spec.ingress[0].from[1]: must set podSelector, "
         "namespaceSelector or ipBlock"],
    ),
    (
        "cilium unknown and refused entities",
        """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: c
        spec:
          endpointSelector: {}
          ingress:
          - fromEntities: [world, galaxy, kube-apiserver]
        """,
        ['CiliumNetworkPolicy default/c: spec.ingress[0].fromEntities[1]: must be one of "all", '
         '"world", "cluster", "host", "remote-node" (got "galaxy")',
         "CiliumNetworkPolicy default/c: spec.ingress[0].fromEntities[2]: kube-apiserver is not "
         "supported (a nodemesh cluster has no kube-apiserver)"],
    ),
    (
        "cilium toFQDNs and kafka rules",
        """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: c
        spec:
          endpointSelector: {}
          egress:
          - toFQDNs:
            - matchName: example.com
          - toPorts:
            - ports:
              - port: "9092"
              rules:
                kafka:
                - topic: orders
        """,
        ["CiliumNetworkPolicy default/c: spec.egress[0].toFQDNs: not supported by nodemesh "
         "(DNS-based policy needs Cilium's DNS proxy)",
         "CiliumNetworkPolicy default/c: spec.egress[1].toPorts[0].rules.kafka: not supported by "
         "nodemesh (nodemesh enforces HTTP rules only)"],
    ),
    (
        "cilium HTTP rules on a UDP port, and L7 in a deny rule",
        """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: c
        spec:
          endpointSelector: {}
          ingress:
          - toPorts:
            - ports:
              - port: "80"
                protocol: UDP
              rules:
                http:
                - method: GET
          ingressDeny:
          - toPorts:
            - ports:
              - port: "80"
              rules:
                http:
                - method: GET
        """,
        ["CiliumNetworkPolicy default/c: spec.ingress[0].toPorts[0].ports[0].protocol: must be "
         "TCP or ANY when the port has HTTP rules (got UDP)",
         "CiliumNetworkPolicy default/c: spec.ingressDeny[0].toPorts[0].rules: a deny rule cannot "
         "have L7 rules: it drops whole connections"],
    ),
    (
        "cilium port written as a number",
        """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: c
        spec:
          endpointSelector: {}
          egress:
          - toPorts:
            - ports:
              - port: 80
        """,
        ["CiliumNetworkPolicy default/c: spec.egress[0].toPorts[0].ports[0].port: must be a "
         'string (got an integer; write it in quotes: "80")'],
    ),
    (
        "cilium rule without sections, policy without spec",
        """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: c
        specs:
        - endpointSelector: {}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: d
        """,
        ["CiliumNetworkPolicy default/c: specs[0]: must have at least one of ingress, ingressDeny, "
         "egress or egressDeny",
         "CiliumNetworkPolicy default/d: spec: required: a CiliumNetworkPolicy needs spec or "
         "specs"],
    ),
    (
        "HTTPRoute with RequestRedirect and backendRefs",
        ROUTE.replace("    backendRefs:", "    filters:\n    - type: RequestRedirect\n"
                      "      requestRedirect:\n        scheme: https\n    backendRefs:"),
        ["HTTPRoute default/r: spec.rules[0].filters[0]: a RequestRedirect filter may not be used "
         "together with backendRefs"],
    ),
    (
        "HTTPRoute path not starting with /",
        ROUTE.replace("value: /api", "value: api"),
        ['HTTPRoute default/r: spec.rules[0].matches[0].path.value: must start with "/" when type '
         "is PathPrefix"],
    ),
    (
        "HTTPRoute RequestRedirect together with URLRewrite",
        ROUTE.replace("    backendRefs:\n    - name: echo-v1\n      port: 8080\n",
                      "    filters:\n    - type: RequestRedirect\n      requestRedirect:\n"
                      "        port: 8443\n    - type: URLRewrite\n      urlRewrite:\n"
                      "        hostname: example.org\n"),
        ["HTTPRoute default/r: spec.rules[0].filters[1]: may not be used together with a "
         "RequestRedirect filter"],
    ),
    (
        "HTTPRoute ReplacePrefixMatch with an Exact match",
        ROUTE.replace("type: PathPrefix", "type: Exact").replace(
            "    backendRefs:", "    filters:\n    - type: URLRewrite\n      urlRewrite:\n"
            "        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /v2\n"
            "    backendRefs:"),
        ["HTTPRoute default/r: spec.rules[0].filters[0].urlRewrite.path: ReplacePrefixMatch needs "
         "exactly one match, with a PathPrefix path (the rule has 1 matches)"],
    ),
    (
        "HTTPRoute header modifier repeated and duplicate header",
        ROUTE.replace("    backendRefs:", "    filters:\n    - type: RequestHeaderModifier\n"
                      "      requestHeaderModifier:\n        set:\n        - name: X-A\n"
                      "          value: '1'\n        remove: [x-a]\n"
                      "    - type: RequestHeaderModifier\n      requestHeaderModifier:\n"
                      "        remove: [X-B]\n    backendRefs:"),
        ['HTTPRoute default/r: spec.rules[0].filters[0].requestHeaderModifier.remove[0]: header '
         '"x-a" already has an action in this filter (at '
         "spec.rules[0].filters[0].requestHeaderModifier.set[0])"],
    ),
    (
        "HTTPRoute redirect status code",
        ROUTE.replace("    backendRefs:\n    - name: echo-v1\n      port: 8080\n",
                      "    filters:\n    - type: RequestRedirect\n      requestRedirect:\n"
                      "        statusCode: 305\n"),
        ["HTTPRoute default/r: spec.rules[0].filters[0].requestRedirect.statusCode: must be one "
         "of 301, 302, 303, 307, 308 (got 305)"],
    ),
    (
        "HTTPRoute Gateway parentRef",
        ROUTE.replace('  - group: ""\n    kind: Service\n    name: echo',
                      "  - name: my-gateway"),
        ["HTTPRoute default/r: spec.parentRefs[0]: a Gateway parent is not supported (nodemesh "
         "implements the Gateway API mesh mode (GAMMA) only: a parentRef must be a Service, with "
         'group: "" and kind: Service)'],
    ),
    (
        "HTTPRoute Service parentRef without group",
        ROUTE.replace('  - group: ""\n    kind', "  - kind"),
        ['HTTPRoute default/r: spec.parentRefs[0].group: must be "" for a Service parent: when '
         "omitted it is gateway.networking.k8s.io (nodemesh implements the Gateway API mesh mode "
         '(GAMMA) only: a parentRef must be a Service, with group: "" and kind: Service)'],
    ),
    (
        "HTTPRoute backendRef without port, and a Pod backend",
        ROUTE.replace("      port: 8080\n", "    - name: p\n      kind: Pod\n      port: 80\n"),
        ["HTTPRoute default/r: spec.rules[0].backendRefs[0].port: required for a Service backend "
         "(the Service's port)",
         'HTTPRoute default/r: spec.rules[0].backendRefs[1].kind: only Service backends are '
         'supported (group: "" and kind: Service; got group: "", kind: Pod)'],
    ),
    (
        "HTTPRoute backendRequest longer than request",
        ROUTE + "    timeouts:\n      request: 1s\n      backendRequest: 1500ms\n",
        ['HTTPRoute default/r: spec.rules[0].timeouts.backendRequest: may not be longer than the '
         'request timeout ("1s")'],
    ),
    (
        "GRPCRoute method match with neither service nor method",
        """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata:
          name: g
        spec:
          parentRefs:
          - group: ""
            kind: Service
            name: echo
          rules:
          - matches:
            - method:
                type: Exact
            backendRefs:
            - name: echo
              port: 7070
        """,
        ["GRPCRoute default/g: spec.rules[0].matches[0].method: one or both of service and "
         "method must be set"],
    ),
    (
        "GRPCRoute ExtensionRef filter",
        """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata:
          name: g
        spec:
          rules:
          - filters:
            - type: ExtensionRef
              extensionRef: {group: example.com, kind: Filter, name: f}
        """,
        ["GRPCRoute default/g: spec.rules[0].filters[0].type: ExtensionRef is not supported "
         "(nodemesh has no filter extensions)",
         "GRPCRoute default/g: spec.rules[0].filters[0].extensionRef: not supported by nodemesh "
         "(nodemesh has no filter extensions)"],
    ),
    (
        "document that is not a mapping",
        "- name: web\n- name: api\n",
        ["web.yaml: document 1: must be an object with apiVersion, kind and metadata (got a list)"],
    ),
    (
        "document without kind",
        SERVICE + "---\napiVersion: v1\nmetadata:\n  name: x\n",
        ["web.yaml: document 2: kind: required"],
    ),
    (
        "object without name",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  labels:\n    a: b\n",
        ["web.yaml: document 1 (Namespace): metadata.name: required"],
    ),
    (
        "invalid names",
        SERVICE.replace("name: web", "name: 1web") + "---\n"
        + "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: Prod.Env\n",
        ["Service default/1web: metadata.name: must be a DNS-1035 label: at most 63 characters of "
         "lowercase letters, digits and '-', starting with a letter and ending with a letter or "
         "digit",
         "Namespace Prod.Env: metadata.name: must be a DNS-1123 label: at most 63 characters of "
         "lowercase letters, digits and '-', starting and ending with a letter or digit"],
    ),
    (
        "metadata.generateName",
        SERVICE.replace("  name: web\n", "  name: web\n  generateName: web-\n"),
        ["Service default/web: metadata.generateName: not supported by nodemesh (apply needs a "
         "fixed name: set metadata.name)"],
    ),
    # -- mutual TLS ----------------------------------------------------------------------
    (
        "ServiceAccount with a spec, a bad field type and a misspelt field",
        SERVICE_ACCOUNT + "spec: {}\nautomountServiceAccountToken: \"no\"\nsecrets:\n- nme: t\n",
        ["ServiceAccount default/robot: spec: unknown field",
         "ServiceAccount default/robot: automountServiceAccountToken: must be true or false (got a "
         "string)",
         'ServiceAccount default/robot: secrets[0].nme: unknown field (did you mean "name"?)'],
    ),
    (
        "ServiceAccount with a bad name and imagePullSecrets that are not a list",
        SERVICE_ACCOUNT.replace("name: robot", "name: Robot") + "imagePullSecrets: {name: reg}\n",
        ["ServiceAccount default/Robot: metadata.name: must be a DNS-1123 subdomain: at most 253 "
         "characters of lowercase letters, digits, '-' and '.', each dot-separated part starting "
         "and ending with a letter or digit",
         "ServiceAccount default/Robot: imagePullSecrets: must be a list (got an object)"],
    ),
    (
        "PeerAuthentication portLevelMtls without a selector",
        PEER_AUTH.replace("  selector:\n    matchLabels:\n      app: finance\n", ""),
        ["PeerAuthentication foo/finance: spec.portLevelMtls: requires a selector with matchLabels: "
         "port-level modes apply only to the pods that a workload-specific policy selects"],
    ),
    (
        "PeerAuthentication portLevelMtls with a selector without labels",
        PEER_AUTH.replace("    matchLabels:\n      app: finance\n", "    matchLabels: {}\n"),
        ["PeerAuthentication foo/finance: spec.portLevelMtls: requires a selector with matchLabels: "
         "port-level modes apply only to the pods that a workload-specific policy selects"],
    ),
    (
        "PeerAuthentication port keys that are not port numbers",
        PEER_AUTH.replace("    8080:\n      mode: DISABLE\n",
                          "    http:\n      mode: DISABLE\n    0: {}\n    65536: {}\n"
                          "    \"-1\": {}\n    80.5: {}\n"),
        ['PeerAuthentication foo/finance: spec.portLevelMtls[http]: invalid port: must be a port '
         'number 1-65535 (got "http")',
         "PeerAuthentication foo/finance: spec.portLevelMtls[0]: invalid port: must be a port "
         "number 1-65535 (got 0)",
         "PeerAuthentication foo/finance: spec.portLevelMtls[65536]: invalid port: must be a port "
         "number 1-65535 (got 65536)",
         'PeerAuthentication foo/finance: spec.portLevelMtls[-1]: invalid port: must be a port '
         'number 1-65535 (got "-1")',
         "PeerAuthentication foo/finance: spec.portLevelMtls[\"80.5\"]: invalid port: must be a port "
         "number 1-65535 (got 80.5)"],
    ),
    (
        "PeerAuthentication port given twice",
        PEER_AUTH.replace("    8080:\n      mode: DISABLE\n",
                          "    8080:\n      mode: DISABLE\n    \"8080\":\n      mode: STRICT\n"),
        ["PeerAuthentication foo/finance: spec.portLevelMtls[8080]: port 8080 is given twice"],
    ),
    (
        "PeerAuthentication unknown modes",
        PEER_AUTH.replace("mode: STRICT", "mode: Strict").replace("mode: DISABLE", "mode: disable"),
        ['PeerAuthentication foo/finance: spec.mtls.mode: must be one of "UNSET", "DISABLE", '
         '"PERMISSIVE", "STRICT" (got "Strict")',
         'PeerAuthentication foo/finance: spec.portLevelMtls[8080].mode: must be one of "UNSET", '
         '"DISABLE", "PERMISSIVE", "STRICT" (got "disable")'],
    ),
    (
        "PeerAuthentication unknown fields",
        PEER_AUTH.replace("    mode: STRICT", "    mode: STRICT\n    modes: STRICT")
        + "  action: ALLOW\n",
        ['PeerAuthentication foo/finance: spec.mtls.modes: unknown field (did you mean "mode"?)',
         "PeerAuthentication foo/finance: spec.action: unknown field"],
    ),
    (
        "PeerAuthentication selector with matchExpressions and a bad label",
        PEER_AUTH.replace("      app: finance\n", "      app: -finance\n"
                          "    matchExpressions:\n    - {key: app, operator: Exists}\n"),
        ["PeerAuthentication foo/finance: spec.selector.matchLabels[app]: must be empty or a name "
         "of at most 63 characters of letters, digits, '-', '_' and '.', starting and ending with "
         "a letter or digit",
         "PeerAuthentication foo/finance: spec.selector.matchExpressions: unknown field"],
    ),
    (
        "PeerAuthentication selector in the root namespace",
        PEER_AUTH.replace("namespace: foo", "namespace: nodemesh-system"),
        ['PeerAuthentication nodemesh-system/finance: spec.selector: not supported in the root '
         'namespace "nodemesh-system" (Istio ignores a selector there): put a workload-specific '
         "policy in the namespace of its pods, or remove the selector for a mesh-wide policy"],
    ),
    (
        "PeerAuthentication selector in the root namespace, and a bad port",
        PEER_AUTH.replace("namespace: foo", "namespace: nodemesh-system").replace("8080:", "0:"),
        ["PeerAuthentication nodemesh-system/finance: spec.portLevelMtls[0]: invalid port: must be "
         "a port number 1-65535 (got 0)",
         'PeerAuthentication nodemesh-system/finance: spec.selector: not supported in the root '
         'namespace "nodemesh-system" (Istio ignores a selector there): put a workload-specific '
         "policy in the namespace of its pods, or remove the selector for a mesh-wide policy"],
    ),
    (
        "PeerAuthentication apiVersion",
        PEER_AUTH.replace("security.istio.io/v1", "security.istio.io/v1alpha1"),
        ['PeerAuthentication foo/finance: apiVersion: must be "security.istio.io/v1" or '
         '"security.istio.io/v1beta1" for kind PeerAuthentication (got '
         '"security.istio.io/v1alpha1")'],
    ),
    (
        "PeerAuthentication mtls that is not an object",
        PEER_AUTH.replace("  mtls:\n    mode: STRICT\n", "  mtls: STRICT\n"),
        ["PeerAuthentication foo/finance: spec.mtls: must be an object (got a string)"],
    ),
    (
        "cilium authentication test-always-fail, unknown and missing modes",
        CNP_AUTH.replace("mode: required", "mode: test-always-fail")
        + "  egress:\n  - authentication:\n      mode: Required\n"
          "  - authentication: {}\n",
        ["CiliumNetworkPolicy default/c: spec.ingress[0].authentication.mode: test-always-fail is not "
         'supported (a Cilium test mode that nodemesh does not implement: use "required" or '
         '"disabled")',
         'CiliumNetworkPolicy default/c: spec.egress[0].authentication.mode: must be "disabled" or '
         '"required" (got "Required")',
         "CiliumNetworkPolicy default/c: spec.egress[1].authentication.mode: required"],
    ),
    (
        "cilium authentication in a deny rule, and an unknown field in it",
        CNP_AUTH.replace("mode: required", "mode: required\n      type: spire")
        + "  ingressDeny:\n  - authentication:\n      mode: required\n",
        ["CiliumNetworkPolicy default/c: spec.ingress[0].authentication.type: unknown field",
         "CiliumNetworkPolicy default/c: spec.ingressDeny[0].authentication: unknown field"],
    ),
    # A ServiceAccount name becomes a segment of the pod's SPIFFE ID: a DNS-1123 subdomain.
    (
        "deployment template serviceAccountName that is not a DNS-1123 subdomain",
        DEPLOYMENT.replace("    spec:\n      containers:",
                           "    spec:\n      serviceAccountName: Robot\n      containers:"),
        ["Deployment default/web: spec.template.spec.serviceAccountName: must be a DNS-1123 "
         "subdomain: at most 253 characters of lowercase letters, digits, '-' and '.', each "
         "dot-separated part starting and ending with a letter or digit"],
    ),
    (
        "pod serviceAccountName with a '/' and a deprecated serviceAccount starting with '-'",
        """\
        apiVersion: v1
        kind: Pod
        metadata:
          name: p
        spec:
          serviceAccountName: robot/../admin
          serviceAccount: -robot
          containers:
          - name: c
            image: busybox
        """,
        ["Pod default/p: spec.serviceAccountName: must be a DNS-1123 subdomain: at most 253 "
         "characters of lowercase letters, digits, '-' and '.', each dot-separated part starting "
         "and ending with a letter or digit",
         "Pod default/p: spec.serviceAccount: must be a DNS-1123 subdomain: at most 253 "
         "characters of lowercase letters, digits, '-' and '.', each dot-separated part starting "
         "and ending with a letter or digit"],
    ),
    (
        "pod serviceAccountName of 254 characters, one ending with '.', one with '_'",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n"
        f"  serviceAccountName: {'a' * 254}\n  containers: [{{name: c, image: busybox}}]\n"
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: q\nspec:\n"
        "  serviceAccountName: robot.\n  containers: [{name: c, image: busybox}]\n"
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: r\nspec:\n"
        "  serviceAccount: my_robot\n  containers: [{name: c, image: busybox}]\n",
        [f"Pod default/{name}: spec.{field}: must be a DNS-1123 subdomain: at most 253 characters "
         "of lowercase letters, digits, '-' and '.', each dot-separated part starting and ending "
         "with a letter or digit"
         for name, field in (("p", "serviceAccountName"), ("q", "serviceAccountName"),
                             ("r", "serviceAccount"))],
    ),
    (
        "kinds only nodemesh writes: Identity and TrustBundle",
        "apiVersion: nodemesh.io/v1\nkind: Identity\nmetadata:\n  name: \"256\"\n---\n"
        "apiVersion: nodemesh.io/v1\nkind: TrustBundle\nmetadata:\n  name: roots\n",
        ["web.yaml: document 1: kind: Identity objects are written by nodemesh itself and cannot "
         "be applied",
         "web.yaml: document 2: kind: TrustBundle objects are written by nodemesh itself and cannot "
         "be applied"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in CASES],
                         ids=[c[0] for c in CASES])
def test_invalid_manifest_is_refused_with_exact_messages(text: str, expected: list[str]) -> None:
    assert errors(text) == expected


def test_yaml_syntax_error_names_file_and_line() -> None:
    text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels: app: web\n"
    assert errors(text) == ["web.yaml: line 5: mapping values are not allowed here"]


def test_namespace_conflicting_with_an_explicit_namespace() -> None:
    text = SERVICE.replace("  name: web\n", "  name: web\n  namespace: prod\n")
    assert errors(text, namespace="dev") == [
        'Service prod/web: metadata.namespace: "prod" does not match the namespace "dev" this '
        "apply was given"
    ]


def test_all_problems_of_all_documents_are_reported_together() -> None:
    text = (SERVICE.replace("port: 80", "port: 0") + "---\n"
            + DEPLOYMENT.replace("containerPort: 8080", "containerPort: -1") + "---\n"
            + "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n")
    assert errors(text) == [
        "Service default/web: spec.ports[0].port: must be 1-65535",
        "Deployment default/web: spec.template.spec.containers[0].ports[0].containerPort: must be "
        "1-65535",
        'web.yaml: document 3: kind: unknown kind "Secret" (nodemesh accepts Namespace, Pod, '
        "Service, Deployment, ServiceAccount, NetworkPolicy, CiliumNetworkPolicy, "
        "PeerAuthentication, HTTPRoute, GRPCRoute, EndpointSlice)",
    ]


def test_error_message_format_of_the_exception() -> None:
    with pytest.raises(InvalidManifest) as e:
        validate_objects(load_manifests(SERVICE.replace("port: 80", "port: 0"), "a.yaml"), "a.yaml")
    assert e.value.exit_code == 2
    assert str(e.value) == "error: Service default/web: spec.ports[0].port: must be 1-65535"
