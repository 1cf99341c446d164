"""The Phase 2 training summary as a small markdown report."""

from __future__ import annotations

from typing import Any

from common.provenance import portable_path


def _pct(values) -> str:
    return " | ".join(f"{100 * v:.1f}" for v in values)


def summary_markdown(s: dict[str, Any]) -> str:
    """A small markdown report of one training run (per-layer held-out numbers in %)."""
    tok = s["tokenizer"]
    lines = [
        f"### Phase 2 training ({tok['conditioning']} tokens{', tag ' + s['tag'] if s['tag'] else ''})",
        "",
        f"Data: `{portable_path(s['data'])}` — {s['num_episodes']} demos ({s['train_episodes']} train / {s['val_episodes']} held-out episodes, "
        f"{s['train_steps']} / {s['val_steps']} steps), {s['num_tasks']} tasks, backbone `{s['backbone']}`, device {s['device']}. "
        f"Tokenizer `{portable_path(tok['path'])}` ({tok['content_hash']}): {tok['num_layers']} layers x {tok['tokens_per_layer']} tokens x {tok['num_levels']} levels. "
        f"Wall time {s['wall_seconds']:.1f} s (main {s.get('main_seconds', 0.0):.1f} s{', loaded from its checkpoint' if 'main' not in s.get('stages', ['main']) else ''}, "
        f"draft {s.get('draft_seconds', 0.0):.1f} s).",
        "",
    ]
    main = s.get("main", {})
    if "val_token_acc" in main:
        L = len(main["val_token_acc"])
        lines += [
            "| main (held-out, %) | " + " | ".join(f"L{i}" for i in range(L)) + " | mean |",
            "|---|" + "---|" * (L + 1),
            f"| token acc (teacher-forced) | {_pct(main['val_token_acc'])} | {100 * main['val_mean_token_acc']:.1f} |",
            f"| all tokens of layer right | {_pct(main['val_layer_all_correct'])} | |",
        ]
        if "val_greedy_token_acc" in main:
            lines.append(f"| token acc (greedy decode) | {_pct(main['val_greedy_token_acc'])} | {100 * main['val_greedy_mean_token_acc']:.1f} |")
        lines.append("")
    choice = main.get("decode_choice")
    if choice:
        errors = choice["val_action_mse_by_depth"]
        L = len(errors["argmax"])
        lines += [
            "| held-out action MSE, greedy decode of the first k layers | " + " | ".join(f"k={k}" for k in range(1, L + 1)) + " |",
            "|---|" + "---|" * L,
            "| last layer by argmax | " + " | ".join(f"{e:.2e}" for e in errors["argmax"]) + " |",
            "| last layer by its expected value | " + " | ".join(f"{e:.2e}" for e in errors["expected"]) + " |",
            "",
            f"Decoding chosen for Phase 3 `--auto-decode`: **{choice['layers']} layers, last by "
            f"{'its expected value' if choice['rule'] == 'expected' else 'argmax'}** (MSE {choice['val_action_mse']:.2e}; the smallest depth "
            f"within {100 * choice['tolerance']:.0f}% of the best, {choice['best_val_action_mse']:.2e}; normalized action units"
            + (f"; on the {choice['held_out_episodes']} clean held-out demos, apart from the expert-relabelled ones)."
               if choice.get("held_out") == "clean demos" else ")."),
            "",
        ]
    tc = s.get("train_config", {})
    if tc.get("own_prefix_prob") or tc.get("expected_value_weight"):
        lines += [f"Main-model loss: own-prefix probability {tc.get('own_prefix_prob', 0.0)}, expected-value weight "
                  f"{tc.get('expected_value_weight', 0.0)} (teacher-forced accuracies above are against the demo tokens).", ""]
    d = s.get("draft")
    if d:
        K = len(d["val_token_acc"])
        c = d["costs"]
        tc = s.get("train_config", {})
        copies = tc.get("draft_augment_copies", 0)
        lines += [
            f"Draft: mode `{tc.get('draft_mode', 'parallel')}`, width {tc.get('draft_width')}, {tc.get('draft_hidden_layers')} hidden layers, "
            f"{tc.get('epochs')} epochs" + (f", {copies} perturbed copies of the training inputs (noise {tc.get('draft_augment_noise')} x std)" if copies else "") + ".",
            f"Draft trained on {_draft_targets(tc)}; accuracy below is against the demo tokens.",
            "",
            "| draft (held-out, %) | " + " | ".join(f"L{i}" for i in range(K)) + " | mean |",
            "|---|" + "---|" * (K + 1),
            f"| coarse token acc | {_pct(d['val_token_acc'])} | {100 * d['val_coarse_acc']:.1f} |",
            f"| all tokens of layer right | {_pct(d['val_layer_all_correct'])} | |",
            f"| draft-main agreement (layer) | {_pct(d['agreement_per_layer'])} | |",
            "",
            "Exact-acceptance distribution (accepted layers 0..K, %): " + _pct(d["accepted_layers_distribution"])
            + f"; mean accepted {d['mean_accepted_layers']:.2f} of K = {K} drafted layers.",
            "",
            *_candidate_lines(d.get("candidate_acceptance")),
            f"Cost, draft vs one main pass: params {c['draft_params']:,} vs {c['main_head_params']:,}; FLOPs "
            f"{c['draft_flops_per_pass']:,} vs {c['main_flops_per_pass_mean']:,.0f} (ratio {c['flops_ratio_draft_over_main_pass']:.3f}); "
            f"time {1e3 * c['draft_time_s_median']:.3f} ms vs {1e3 * c['main_pass_time_s_median']:.3f} ms "
            f"(ratio {c['time_ratio_draft_over_main_pass']:.3f}; {c['timing']}).",
            "",
        ]
    return "\n".join(lines) + "\n"



def _draft_targets(tc: dict) -> str:
    if tc.get("draft_targets", "labels") != "main":
        return "the tokenizer’s tokens of the demos"
    if tc.get("draft_soft_targets"):
        return "the main model’s token distributions given its greedy prefix (distillation, KL)"
    return "the main model’s greedy tokens (distillation)"


def _candidate_lines(acc: dict | None) -> list[str]:
    """Held-out acceptance when N candidates per chunk are verified in one pass (``--draft-candidates``)."""
    if not acc:
        return []
    counts = sorted(acc, key=int)
    return [
        "| candidates per chunk (one verify pass) | " + " | ".join(counts) + " |",
        "|---|" + "---|" * len(counts),
        "| mean accepted layers | " + " | ".join(f"{acc[n]['mean_accepted_layers']:.3f}" for n in counts) + " |",
        "| no layer accepted (%) | " + " | ".join(f"{100 * acc[n]['accepted_layers_distribution'][0]:.1f}" for n in counts) + " |",
        "",
    ]
