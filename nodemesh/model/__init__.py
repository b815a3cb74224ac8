"""Resource model: the Kubernetes-style kinds nodemesh accepts, their parsing and validation.

Objects are plain dicts in the shape users write them (``apiVersion``, ``kind``, ``metadata``,
``spec``, ``status``). This package turns manifests into validated, defaulted objects and refuses
anything it does not understand with a message that names the resource and the field.

- ``kinds``: the registry of kinds (apiVersion, scope, CLI names) and how objects are named.
- ``manifest``: files, directories and stdin → YAML documents → raw objects.
- ``validate``: per-object validation and defaulting (``validate_objects``).
- ``admission``: checks against the stored objects, ClusterIP allocation (``admit``).
- ``labels``: label syntax and selector matching.
- ``schema``: the small schema language the per-kind modules are written in
  (``workloads``, ``service``, ``netpol``, ``cnp``, ``security``, ``routes``, ``common``,
  ``names``).

docs/resources.md lists, per kind and field, what is accepted, accepted with no effect, or refused.
"""
