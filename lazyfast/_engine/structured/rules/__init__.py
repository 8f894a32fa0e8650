"""The layer rules: the open registry, the built-in rules and each layer family's own code.

* :mod:`.registry` — the rule table (``register_rule`` / ``unregister_rule`` / ``registered_rules``,
  ``find_rule``); the protocol of a custom rule.
* :mod:`.builtin` — the built-in module rules (registered when this package is imported), which
  rule a module takes (``rule_kind``) and what it covers (``_wb``).
* :mod:`.ops` — operator rules (an op in a forward, whatever module calls it) and their shells.
* one module per layer family, with its applies-check, shell and per-layer factor code:
  :mod:`.linear`, :mod:`.conv`, :mod:`.norm`, :mod:`.embedding`, :mod:`.scale`, :mod:`.attention`,
  :mod:`.custom` (registered rules).

The per-layer functions take ``L``, a layer of the plan (:class:`lazyfast._engine.structured.plan._Layer`:
its module, kind, which of weight / bias are on, per-call shapes, contraction order).
"""
from lazyfast._engine.structured.rules.registry import (Rule, _BUILTIN, _RULES, _register_builtin,  # noqa: F401
                                                        find_rule, register_rule, registered_rules, rule_for,
                                                        unregister_rule)
from lazyfast._engine.structured.rules.builtin import rule_kind  # noqa: F401  (registers the built-in rules)

__all__ = ["Rule", "register_rule", "unregister_rule", "registered_rules", "rule_for", "find_rule"]
