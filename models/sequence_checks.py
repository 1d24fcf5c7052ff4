"""Sequence validation: every problem of a sequence file at once, named by step and rule.

Kept apart from the schema (models/sequence.py): pydantic's own errors are translated
into `SequenceIssue`s, the content checks (subjects, bodies, variants) and the graph
checks (edge targets, reachability, every path ends, waitless loops) run on a lenient
reading so that one broken step does not hide the others.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from models.sequence import (
    ALLOWED_TRIGGERS,
    EVENT_TRIGGERS,
    MESSAGE_ACTIONS,
    NEGATIVE_OF,
    Action,
    Edge,
    SendWindow,
    SequenceDefinition,
    Step,
    Timeline,
    Trigger,
    Variant,
    aware,
    zone,
)
from models.time_fields import clock

__all__ = [
    "SequenceIssue",
    "SequenceValidationError",
    "check_definition",
    "graph_issues",
    "lenient_definition",
    "validate_definition",
]


class SequenceIssue(BaseModel):
    """One validation error, naming the step (when there is one) and the rule broken."""

    step: str | None = None
    rule: str
    message: str

    def __str__(self) -> str:
        where = f"step {self.step!r}: " if self.step else ""
        return f"{where}{self.message} [{self.rule}]"


class SequenceValidationError(ValueError):
    """A sequence file that cannot become a version."""

    def __init__(self, issues: list[SequenceIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _pydantic_issues(raw: dict[str, Any], err: ValidationError) -> list[SequenceIssue]:
    issues = []
    raw_steps = raw.get("steps")
    steps: list[Any] = raw_steps if isinstance(raw_steps, list) else []
    for e in err.errors():
        loc = list(e["loc"])
        step_id = None
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            item = steps[loc[1]] if loc[1] < len(steps) else None
            step_id = str(item.get("id")) if isinstance(item, dict) and item.get("id") else None
            step_id = step_id or f"#{loc[1] + 1}"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc) or "step"
        rule = {
            "enum": "unknown-value",
            "extra_forbidden": "unknown-field",
            "missing": "required-field",
        }.get(e["type"], "invalid-field")
        if field == "timezone":
            rule = "unknown-timezone"
        elif field.endswith("action") and e["type"] == "enum":
            rule = "unknown-action"
        elif field.endswith("trigger") and e["type"] == "enum":
            rule = "unknown-trigger"
        elif "after" in field or "delay" in field:
            rule = "malformed-duration"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "enum":
            msg = f"{field}: {e.get('input')!r} is not one of {e['ctx']['expected']}"
        else:
            msg = f"{field}: {msg}"
        issues.append(SequenceIssue(step=step_id, rule=rule, message=msg))
    return issues


def _content_issues(step: Step) -> list[SequenceIssue]:
    issues: list[SequenceIssue] = []
    act = step.action
    sources: list[Any] = step.variants or [step]
    names = [v.name for v in step.variants]
    if len(set(names)) != len(names):
        issues.append(SequenceIssue(step=step.id, rule="duplicate-variant", message="variant names repeat"))
    for src in sources:
        label = f"variant {src.name!r}: " if isinstance(src, Variant) else ""
        if act == Action.SEND_EMAIL:
            if not (src.subject and src.subject.strip()):
                issues.append(
                    SequenceIssue(
                        step=step.id,
                        rule="missing-content",
                        message=f"{label}SEND_EMAIL needs a subject",
                    )
                )
            if not ((src.body and src.body.strip()) or (src.html and src.html.strip())):
                issues.append(
                    SequenceIssue(
                        step=step.id,
                        rule="missing-content",
                        message=f"{label}SEND_EMAIL needs a body",
                    )
                )
        elif act in (Action.SEND_TWITTER_DM, Action.SEND_LINKEDIN_DM, Action.SEND_XMTP_DM):
            if not ((src.text and src.text.strip()) or (src.body and src.body.strip())):
                issues.append(SequenceIssue(step=step.id, rule="missing-content", message=f"{label}{act} needs text"))
    if step.variants and act not in MESSAGE_ACTIONS:
        issues.append(
            SequenceIssue(
                step=step.id,
                rule="content-on-silent-step",
                message=f"{act} sends no message; variants make no sense here",
            )
        )
    return issues


def validate_definition(raw: dict[str, Any]) -> SequenceDefinition:
    """Validate a parsed sequence file and return the definition.

    Raises:
        SequenceValidationError: with every issue found, each naming the step and rule.
    """
    definition, issues = check_definition(raw)
    if issues or definition is None:
        raise SequenceValidationError(issues)
    return definition


#: Graph rules still reported for a step whose own fields did not validate.
_STRUCTURAL = frozenset({"duplicate-step", "edge-target", "unreachable", "never-ends", "cycle-without-wait"})


def check_definition(raw: dict[str, Any]) -> tuple[SequenceDefinition | None, list[SequenceIssue]]:
    """Every issue of a parsed sequence file, and the definition when there is none.

    Field errors (an unknown action, a malformed duration …) do not hide graph errors
    elsewhere in the file: the graph is then checked on a lenient reading of the raw
    steps, so one run of `sequences validate` lists everything to fix.
    """
    try:
        definition = SequenceDefinition.model_validate(raw)
    except ValidationError as err:
        issues = _pydantic_issues(raw, err)
        lenient, placeholders = lenient_definition(raw)
        seen = {(i.step, i.rule, i.message) for i in issues}
        for issue in graph_issues(lenient):
            if issue.step in placeholders and issue.rule not in _STRUCTURAL:
                continue
            if issue.step is None and issue.rule not in ("send-window", "timeline"):
                continue
            if (issue.step, issue.rule, issue.message) not in seen:
                issues.append(issue)
                seen.add((issue.step, issue.rule, issue.message))
        return None, issues
    issues = graph_issues(definition)
    return (None if issues else definition), issues


def lenient_definition(raw: dict[str, Any]) -> tuple[SequenceDefinition, set[str]]:
    """A best-effort definition of a file with field errors, for the graph checks.

    A step that does not validate becomes a silent placeholder keeping its id and the
    targets of its edges; the returned set names those placeholders.
    """
    steps: list[Step] = []
    placeholders: set[str] = set()
    raw_steps = raw.get("steps") if isinstance(raw.get("steps"), list) else []
    for index, item in enumerate(raw_steps or []):
        if not isinstance(item, dict):
            continue
        try:
            steps.append(Step.model_validate(item))
            continue
        except ValidationError as err:
            repaired = _repair_durations(item, err)
        if repaired is not None:  # only durations were malformed: check the rest of the step as written
            steps.append(repaired)
            continue
        sid = str(item.get("id") or f"#{index + 1}")
        edges: list[Edge] = []
        raw_edges = item.get("edges") if isinstance(item.get("edges"), list) else []
        for raw_edge in raw_edges or []:
            target = raw_edge.get("to") if isinstance(raw_edge, dict) else None
            if isinstance(target, str) and target:
                edges.append(Edge.model_construct(trigger=Trigger.NORMAL_EDGE, to=target, after=None, at=None))
            else:  # an edge we cannot read, or END: count it as an end (no cascade of never-ends)
                edges.append(Edge.model_construct(trigger=Trigger.END, to=None, after=None, at=None))
        placeholders.add(sid)
        steps.append(
            Step.model_construct(
                id=sid,
                action=Action.WAIT,
                subject=None,
                body=None,
                html=None,
                text=None,
                variants=[],
                delay=timedelta(seconds=1),  # a placeholder never makes a waitless loop on its own
                at=None,
                edges=edges,
            )
        )

    def part(model: type[BaseModel], value: Any) -> Any:
        if value is None:
            return None
        try:
            return model.model_validate(value)
        except ValidationError:
            return None

    definition = SequenceDefinition.model_construct(
        name=str(raw.get("name") or "?"),
        timezone=zone(raw.get("timezone") if isinstance(raw.get("timezone"), str) else None),
        send_window=part(SendWindow, raw.get("send_window")),
        timeline=part(Timeline, raw.get("timeline")),
        steps=steps,
    )
    return definition, placeholders


def _repair_durations(item: dict[str, Any], err: ValidationError) -> Step | None:
    """The step with its malformed `after`/`delay` values replaced by 1d, if that is all that is wrong."""
    fixed = dict(item)
    edges = (
        [dict(e) if isinstance(e, dict) else e for e in item.get("edges") or []]
        if isinstance(item.get("edges"), list)
        else None
    )
    for e in err.errors():
        loc = e["loc"]
        if loc == ("delay",):
            fixed["delay"] = "1d"
        elif len(loc) == 3 and loc[0] == "edges" and loc[2] == "after" and edges is not None:
            index = loc[1]
            if isinstance(index, int) and index < len(edges) and isinstance(edges[index], dict):
                edges[index]["after"] = "1d"
            else:
                return None
        else:
            return None
    if edges is not None:
        fixed["edges"] = edges
    try:
        return Step.model_validate(fixed)
    except ValidationError:
        return None


def _is_instant(edge: Edge) -> bool:
    """An edge that, taken a second time around a loop, waits for nothing.

    An absolute `at` waits only the first time (after that the moment has passed).
    """
    return edge.trigger == Trigger.NORMAL_EDGE and not edge.after


def _step_waits(step: Step) -> bool:
    return bool(step.delay)


def graph_issues(d: SequenceDefinition) -> list[SequenceIssue]:
    """Every structural problem of a definition (empty when it is sound), in a stable order:
    the schedule, step ids, each step and its edges, reachability, ends, loops without a wait."""
    issues = _schedule_issues(d)
    if not d.steps:
        return issues
    ids = [s.id for s in d.steps]
    known = set(ids)
    issues += _duplicate_ids(ids)
    for step in d.steps:
        issues += _step_issues(step, known)
    # The graph checks ignore edges to missing steps (reported above) and count such an
    # edge as a possible end, so one typo does not cascade into a page of errors.
    graph: dict[str, list[str]] = {}
    for s in d.steps:
        graph.setdefault(s.id, []).extend(e.to for e in s.edges if e.to and e.to in known)
    reach = _reachable(graph, ids[0])
    issues += [
        SequenceIssue(
            step=sid, rule="unreachable", message=f"step {sid!r} cannot be reached from the first step {ids[0]!r}"
        )
        for sid in dict.fromkeys(ids)
        if sid not in reach
    ]
    ends = _can_end(d, graph, known)
    issues += [
        SequenceIssue(step=sid, rule="never-ends", message=f"no path from step {sid!r} reaches an END")
        for sid in dict.fromkeys(ids)
        if sid in reach and sid not in ends
    ]
    return issues + _cycles_without_wait(d, ids, known)


def _schedule_issues(d: SequenceDefinition) -> list[SequenceIssue]:
    """An empty or inverted send window; a timeline that ends before it starts."""
    issues: list[SequenceIssue] = []
    w = d.send_window
    if w is not None and w.start_time() >= w.end_time():
        issues.append(
            SequenceIssue(
                step=None,
                rule="send-window",
                message=f"send window is empty or inverted: start {clock(w.start)} is not before end {clock(w.end)}",
            )
        )
    if d.timeline and d.timeline.start and d.timeline.end and aware(d.timeline.start) >= aware(d.timeline.end):
        issues.append(SequenceIssue(step=None, rule="timeline", message="timeline start is not before its end"))
    return issues


def _duplicate_ids(ids: list[str]) -> list[SequenceIssue]:
    issues: list[SequenceIssue] = []
    seen: set[str] = set()
    for sid in ids:
        if sid in seen:
            issues.append(
                SequenceIssue(step=sid, rule="duplicate-step", message=f"step id {sid!r} is used more than once")
            )
        seen.add(sid)
    return issues


def _step_issues(step: Step, known: set[str]) -> list[SequenceIssue]:
    """One step: its content, how its triggers combine, each edge, and its own timing."""
    issues = _content_issues(step)

    def add(rule: str, message: str) -> None:
        issues.append(SequenceIssue(step=step.id, rule=rule, message=message))

    triggers = [e.trigger for e in step.edges]
    for trig in sorted(set(triggers)):
        if triggers.count(trig) > 1:
            add("duplicate-trigger", f"trigger {trig} appears more than once")
    if Trigger.END in triggers and len(triggers) > 1:
        add("end-alone", "END cannot be combined with other edges")
    if Trigger.NORMAL_EDGE in triggers and len(set(triggers)) > 1:
        add("normal-edge-alone", "NORMAL_EDGE cannot be combined with other triggers")
    for edge in step.edges:
        for rule, message in _edge_problems(step, edge, known):
            add(rule, message)
    if step.edges and all(e.trigger in EVENT_TRIGGERS for e in step.edges):
        add("waits-forever", "only event triggers leave this step: add a NOT_* edge with `after`")
    if step.delay is not None and step.at is not None:
        add("delay-or-at", "a step takes `delay` or `at`, not both")
    return issues


def _edge_problems(step: Step, edge: Edge, known: set[str]) -> list[tuple[str, str]]:
    """(rule, message) for each thing wrong with one edge of `step`."""
    problems: list[tuple[str, str]] = []
    if edge.trigger not in ALLOWED_TRIGGERS[step.action]:
        problems.append(("trigger-fits-action", f"trigger {edge.trigger} cannot follow action {step.action}"))
    if edge.trigger == Trigger.END:
        if edge.to:
            problems.append(("end-has-no-target", "END leads nowhere; remove `to`"))
        return problems
    if not edge.to:
        problems.append(("edge-target", f"{edge.trigger} edge has no `to`"))
    elif edge.to not in known:
        problems.append(("edge-target", f"{edge.trigger} edge points to missing step {edge.to!r}"))
    if edge.trigger in NEGATIVE_OF and not edge.after:
        problems.append(
            (
                "negative-needs-after",
                f"{edge.trigger} needs `after` (how long to wait for {NEGATIVE_OF[edge.trigger]}), longer than 0s",
            )
        )
    if edge.trigger in EVENT_TRIGGERS and (edge.after or edge.at):
        problems.append(
            ("event-has-no-timer", f"{edge.trigger} fires on the event; `after`/`at` belong on its negative twin")
        )
    if edge.after is not None and edge.at is not None:
        problems.append(("after-or-at", "an edge takes `after` or `at`, not both"))
    return problems


def _reachable(graph: dict[str, list[str]], first: str) -> set[str]:
    reach: set[str] = set()
    stack = [first]
    while stack:
        node = stack.pop()
        if node in reach:
            continue
        reach.add(node)
        stack.extend(graph[node])
    return reach


def _can_end(d: SequenceDefinition, graph: dict[str, list[str]], known: set[str]) -> set[str]:
    """Steps from which some path reaches an END (an edge to a missing step counts as one)."""
    ends = {
        s.id
        for s in d.steps
        if not s.edges or any(e.trigger == Trigger.END or (e.to and e.to not in known) for e in s.edges)
    }
    changed = True
    while changed:
        changed = False
        for sid, targets in graph.items():
            if sid not in ends and any(t in ends for t in targets):
                ends.add(sid)
                changed = True
    return ends


def _cycles_without_wait(d: SequenceDefinition, ids: list[str], known: set[str]) -> list[SequenceIssue]:
    """Each loop that could spin without a timer (reported once, at the step it closes on)."""
    issues: list[SequenceIssue] = []
    by_id = {s.id: s for s in d.steps}
    instant: dict[str, list[str]] = {}
    for s in d.steps:
        instant.setdefault(s.id, []).extend(
            e.to for e in s.edges if e.to and e.to in known and _is_instant(e) and not _step_waits(by_id[e.to])
        )
    color: dict[str, int] = {}
    reported: set[frozenset[str]] = set()

    def visit(node: str, trail: list[str]) -> None:
        color[node] = 1
        for nxt in instant[node]:
            if color.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                key = frozenset(cycle)
                if key not in reported:
                    reported.add(key)
                    issues.append(
                        SequenceIssue(
                            step=nxt,
                            rule="cycle-without-wait",
                            message="loop with no wait in it: "
                            + " -> ".join(cycle)
                            + " (give one of its edges an `after` or one of its steps a `delay`)",
                        )
                    )
            elif color.get(nxt) is None:
                visit(nxt, trail + [nxt])
        color[node] = 2

    for sid in dict.fromkeys(ids):
        if color.get(sid) is None:
            visit(sid, [sid])
    return issues
