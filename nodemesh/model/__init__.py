"""Resource model: the Kubernetes-style kinds nodemesh accepts, their parsing and validation.

Objects are plain dicts in the shape users write them (``apiVersion``, ``kind``, ``metadata``,
``spec``, ``status``). This package turns manifests into validated, defaulted objects and refuses
anything it does not understand with a message that names the resource and the field.
"""
