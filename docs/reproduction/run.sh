#!/usr/bin/env bash
# The reproduction study of docs/reproduction.md, resumable across machines and sessions.
#
# Every scored item goes to results/study.sqlite (not in git). The rows travel in git as
# docs/reproduction/data/rows.csv.gz: this script imports them first, so nothing is scored twice,
# and exports them again after every step, so a killed run loses at most the step in flight.
#
#   bash docs/reproduction/run.sh            # everything that resumes: heldout, heatmap, families, choice
#   bash docs/reproduction/run.sh cost       # one part: heldout | heatmap | families | choice | cheaper | cost | gsm8k
#
# cost is a timing run from empty databases (about 45 min): it starts over every time, so it runs
# only when named. gsm8k (issue 25's study, hours per plan) runs only when named too.
#
# Threads: GGUFLOOP_THREADS (default 2). Caps on items and shots, and why, are in docs/reproduction.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
G=${GGUFLOOP:-.venv/bin/ggufloop}
T=${GGUFLOOP_THREADS:-2}
DB=results/study.sqlite
OUT=docs/reproduction
ROWS=$OUT/data/rows.csv.gz
mkdir -p "$OUT/data" "$OUT/cost" "$OUT/heldout" results

GENS=$OUT/data/generations.csv.gz  # the generative tasks' answers (gsm8k), text and scores

sync_rows() {  # import what git has, export what the database has
    if [ -f "$ROWS" ]; then "$G" report --db "$DB" --import "$ROWS" >/dev/null; fi
    if [ -f "$GENS" ]; then "$G" report --db "$DB" --import-generations "$GENS" >/dev/null; fi
    "$G" report --db "$DB" --export "$ROWS" --export-generations "$GENS" >/dev/null
}

# the blocks of cost, choice and families: SmolLM2-135M, WinoGrande 0-shot, starting at 8..17, 2 or 3 layers, K = 3
BLOCKS="smollm2-135m-instruct --tasks winogrande --shots 0 --starts 8:18 --sizes 2:4 --counts 3 -t $T"
COST="$BLOCKS --mixes none,uniform"  # cost's 40 candidates: those blocks, naive and uniform

cost() {  # tune against the full grid of the same 40 candidates on the same search items, each timed from scratch
    local method flag fresh
    for method in halving grid; do
        flag=""; [ $method = grid ] && flag=--grid
        fresh=results/cost-$method.sqlite  # a database of its own, so that nothing is reused and the clock is fair
        rm -f $fresh $fresh-wal $fresh-shm
        /usr/bin/time -v -o $OUT/cost/time-$method.txt "$G" tune $COST $flag --db $fresh \
            --json $OUT/cost/tune-$method.json > $OUT/cost/tune-$method.txt
        "$G" report --db $fresh --export results/cost-$method.csv.gz >/dev/null
        "$G" report --db "$DB" --import results/cost-$method.csv.gz >/dev/null
        sync_rows
    done
}

choice() {  # which plan each of cost's two searches picks, with the exact scorer, on the study's shared rows
    # (the scores depend on the item alone, so the choices are those of fresh runs; cost's own runs give the times)
    local method flag
    mkdir -p $OUT/cost/choice
    for method in halving grid; do
        flag=""; [ $method = grid ] && flag=--grid
        "$G" tune $COST $flag --db "$DB" --json $OUT/cost/choice/tune-$method.json > $OUT/cost/choice/tune-$method.txt
        sync_rows
    done
    "${PYTHON:-.venv/bin/python}" $OUT/cost.py --db "$DB" --runs $OUT/cost/choice > $OUT/cost/choice/summary.md
}

cheaper() {  # searches at about a twentieth of the grid (issue 28, item 3): margin ranking, a smaller n0, a budget,
    # on choice's rows (the grid scored every candidate on every search item: only the held-out verdicts are new),
    # then 100 replays of halving in other item orders from the same rows
    local name args
    mkdir -p $OUT/cost/cheaper
    for name in margin:--rank=margin budget-accuracy:--budget=1330 budget-margin:--rank=margin,--budget=1330 \
        n0-8-accuracy:--n0=8 n0-8-margin:--rank=margin,--n0=8; do
        args=$(echo "${name#*:}" | tr ',=' '  ')
        "$G" tune $COST $args --db "$DB" --json $OUT/cost/cheaper/tune-${name%%:*}.json > $OUT/cost/cheaper/tune-${name%%:*}.txt
        sync_rows
    done
    "${PYTHON:-.venv/bin/python}" $OUT/cost.py --db "$DB" --runs $OUT/cost/choice --cheaper $OUT/cost/cheaper \
        --replays 100 > $OUT/cost/cheaper/summary.md
}

families() {  # every way of looping, each tuned on the same candidates; judged against uniform on held-out items
    local mix
    mkdir -p $OUT/families
    for mix in ${FAMILIES:-none uniform ema autoalign euler anchored inputanchor}; do
        "$G" tune $BLOCKS --db "$DB" --mixes $mix --json $OUT/families/tune-$mix.json > $OUT/families/tune-$mix.txt
        sync_rows
    done
    "${PYTHON:-.venv/bin/python}" $OUT/families.py --db "$DB" $OUT/families/tune-*.json > $OUT/families/compare.md
}

heatmap() {  # the paper's heat map: WinoGrande, K = 3, naive and uniform, the same blocks and items
    # one start at a time, both mixes, so that a stopped run leaves complete pairs to compare
    local model sizes starts s mix
    for spec in "gemma3-270m 2:5 0:17" "smollm2-135m-instruct 2:5 4:24"; do
        read -r model sizes starts <<< "$spec"
        for s in $(seq ${starts%:*} $(( ${starts#*:} - 1 ))); do
            for mix in none uniform; do
                "$G" sweep $model --task winogrande --count 3 --mix $mix --sizes $sizes --starts $s:$((s + 1)) \
                    --shots 0 --limit 500 -t $T --db "$DB" -o results/heatmap-steps >/dev/null
            done
            sync_rows
        done
        for mix in none uniform; do  # the whole map from the database: Holm over all its blocks
            "$G" sweep $model --task winogrande --count 3 --mix $mix --sizes $sizes --starts $starts --shots 0 \
                --limit 500 -t $T --db "$DB" -o $OUT
        done
        "${PYTHON:-.venv/bin/python}" $OUT/heatmap.py $model --db "$DB" --sizes $sizes --starts $starts -o $OUT/heatmap
    done
}

heldout() {  # per model, the plan tune selects among naive and uniform blocks, against the unlooped model on held-out items
    # no --budget: successive halving runs until two finalists are left (a budget of 8000 stopped SmolLM2's
    # 120 candidates after rung 0, choosing on 64 items; that run is kept in heldout/budget8000)
    local model
    for model in gemma3-270m smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
        "$G" tune $model --tasks winogrande,arc_easy --shots 0 --limit 1000 --counts 3 --mixes none,uniform \
            --finalists 2 -t $T --db "$DB" \
            --json $OUT/heldout/tune-$model.json > $OUT/heldout/tune-$model.txt
        sync_rows
        "${PYTHON:-.venv/bin/python}" $OUT/heldout.py $OUT/heldout/tune-*.json > $OUT/heldout/table.md
    done
}

gsm8k() {  # GSM8K test (1,319 items; 8-shot chain of thought through the chat template, greedy, 256 new tokens)
    # docs/reproduction.md §5: steps of (model, plan, items) in priority order, each paired against the unlooped
    # model on the same items, so that the answers reach git as they finish and a killed run loses at most one
    # step's unfinished answers (a step already done costs nothing: its rows are read back). The 1.5B model comes
    # in early with the 0.5B's first plan, its block rescaled to 28 layers (11:14 of 24 -> 13:16; 15:19 -> 18:23, the
    # same twelfths of the depth, so gsm8k.py pools them as one family). The floor (issue 25 §6.4) comes last.
    local step model plan limit name
    mkdir -p $OUT/gsm8k
    for step in \
        qwen2.5-coder-0.5b-instruct,11:14x3/uniform,400 qwen2.5-coder-1.5b-instruct,13:16x3/uniform,100 \
        qwen2.5-coder-0.5b-instruct,11:14x3/uniform,800 qwen2.5-coder-1.5b-instruct,13:16x3/uniform,200 \
        qwen2.5-coder-0.5b-instruct,11:14x3/uniform,1319 qwen2.5-coder-1.5b-instruct,13:16x3/uniform,400 \
        qwen2.5-coder-0.5b-instruct,15:19x3/uniform,400 qwen2.5-coder-0.5b-instruct,11:14x3/uniform@bypass,400 \
        qwen2.5-coder-0.5b-instruct,15:19x3/uniform,1319 qwen2.5-coder-1.5b-instruct,13:16x3/uniform,1319 \
        qwen2.5-coder-1.5b-instruct,18:23x3/uniform,400 qwen2.5-coder-0.5b-instruct,11:14x3/uniform@bypass,1319 \
        qwen2.5-coder-1.5b-instruct,18:23x3/uniform,1319 qwen2.5-coder-0.5b-instruct,15:19x3/uniform@bypass,1319 \
        gemma3-270m,5:8x3/uniform,300 smollm2-135m-instruct,7:11x3/uniform,300
    do
        IFS=, read -r model plan limit <<< "$step"
        name=$OUT/gsm8k/eval-$model-$(echo "$plan" | tr ':/@' '___')
        # written beside and renamed at the end, so that a rung under way leaves the last rung's table in place
        "$G" eval $model --tasks gsm8k --loop $plan --limit $limit -t $T --db "$DB" --json $name.json > $name.txt.part
        mv $name.txt.part $name.txt
        sync_rows
        "${PYTHON:-.venv/bin/python}" $OUT/gsm8k.py --db "$DB" > $OUT/gsm8k/summary.md
    done
    # step 1's third plan: the one a GSM8K search selects for the 0.5B model. Candidates: uniform blocks of 2-4
    # layers starting in the middle half, K = 3 (naive blocks dropped out of every multiple-choice search, §2);
    # a prefilter on §2's two tasks, 0-shot as there (so the rows it has are reused), keeping 6; then halving on
    # GSM8K search items from n0 = 16 with the rungs' answers (8-shot chat, as above), one finalist, its verdict on
    # the held-out GSM8K items
    local tuned=$OUT/gsm8k/tune-qwen2.5-coder-0.5b-instruct
    "$G" tune qwen2.5-coder-0.5b-instruct --tasks gsm8k --prefilter winogrande,arc_easy --prefilter-shots 0 \
        --prefilter-keep 6 --starts 6:18 --sizes 2:5 --counts 3 --mixes uniform --n0 16 --finalists 1 -t $T \
        --db "$DB" --json $tuned.json > $tuned.txt.part
    mv $tuned.txt.part $tuned.txt
    sync_rows
    "${PYTHON:-.venv/bin/python}" $OUT/gsm8k.py --db "$DB" > $OUT/gsm8k/summary.md
}

sync_rows
for part in ${@:-heldout heatmap families choice}; do
    "$part"
done
sync_rows
