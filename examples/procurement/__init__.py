"""The reference scenario, runnable: five downstream systems and a scripted procurement agent.

- ``python -m examples.procurement.resource_servers --config var/demo/credentials.json``
- ``python -m examples.procurement.agent --config var/demo/credentials.json``

``make demo`` (scripts/demo.sh) starts everything, including Countersign itself.
"""
