"""The demo app's Kubernetes YAML: a frontend, an API in two versions, a store, a client and an
intruder, with an L3/L4 policy on the store, an L7 policy on the API and a 90/10 canary route."""

NAMESPACE = "demo"
CANARY = (90, 10)

APP = """
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels: {app.kubernetes.io/part-of: nodemesh-demo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: frontend, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: frontend}}
  template:
    metadata: {labels: {app: frontend}}
    spec:
      containers:
      - name: frontend
        image: nodemesh/demo-app
        args: ["--name=frontend", "--port=8080", "--upstream=http://api/"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: frontend, namespace: demo}
spec:
  selector: {app: frontend}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api-v1, namespace: demo}
spec:
  replicas: 2
  selector: {matchLabels: {app: api, version: v1}}
  template:
    metadata: {labels: {app: api, version: v1}}
    spec:
      containers:
      - name: api
        image: nodemesh/demo-app
        args: ["--name=api", "--version=v1", "--port=8080", "--upstream=http://store:8080/"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api-v2, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: api, version: v2}}
  template:
    metadata: {labels: {app: api, version: v2}}
    spec:
      containers:
      - name: api
        image: nodemesh/demo-app
        args: ["--name=api", "--version=v2", "--port=8080", "--upstream=http://store:8080/"]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: demo}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: api-v1, namespace: demo}
spec:
  selector: {app: api, version: v1}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: api-v2, namespace: demo}
spec:
  selector: {app: api, version: v2}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: store, namespace: demo}
spec:
  replicas: 1
  selector: {matchLabels: {app: store}}
  template:
    metadata: {labels: {app: store}}
    spec:
      containers:
      - name: store
        image: registry.k8s.io/gateway-api/conformance/echo-basic
        args: ["--port=8080"]
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: store, namespace: demo}
spec:
  selector: {app: store}
  ports: [{name: http, port: 8080, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  containers: [{name: client, image: debian, command: [sleep, infinity]}]
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: demo, labels: {app: intruder}}
spec:
  containers: [{name: intruder, image: debian, command: [sleep, infinity]}]
"""

POLICIES = """
# L3/L4: only the API may talk to the store.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: store-only-from-api, namespace: demo}
spec:
  podSelector: {matchLabels: {app: store}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: http}]
---
# L7: the API serves GET /items... to the frontend and the client; nobody may POST.
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-read-only, namespace: demo}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints:
    - matchLabels: {app: frontend}
    - matchLabels: {app: client}
    - matchLabels: {app: intruder}
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/items.*"}
        - {method: GET, path: "/"}
"""

CANARY_ROUTE = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: api-canary, namespace: demo}}
spec:
  parentRefs: [{{group: "", kind: Service, name: api, port: 80}}]
  rules:
  - backendRefs:
    - {{name: api-v1, port: 80, weight: {CANARY[0]}}}
    - {{name: api-v2, port: 80, weight: {CANARY[1]}}}
"""
