"""Provisioning: the broker's users and the database's roles, beside the topology they guard.

- ``broker``: one RabbitMQ user per service, allowed only its own queue and the routes the
  topology's table of accepted messages names it the sender of (``GRANTS``), applied through
  the management API (``messaging.management``) or written as a definitions file;
- ``database``: one PostgreSQL role per service owning only its own schema, and the operator's;
- ``principals``: both at once, with fresh passwords, for a process that hosts every service
  (the demo, the chaos run).

Every list of principals here derives from ``messaging.topology.SERVICES``.
"""
