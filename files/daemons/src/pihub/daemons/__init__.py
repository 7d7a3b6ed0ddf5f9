"""The daemons: one module each, a package where it has private parts.

Each console script ``pihub-<name>`` runs ``pihub.daemons.<name>:main``.
"""
