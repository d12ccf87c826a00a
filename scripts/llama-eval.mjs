// Runs a GGUF model (and optionally a LoRA adapter GGUF) in llama.cpp through
// node-llama-cpp, on the CPU. After a prompt of token ids it prints as JSON
// what the engine computes; after a text prompt, the greedy continuation as text:
//
//   node llama-eval.mjs --runtime DIR --model base.gguf [--lora adapter.gguf [--scale 1]]
//                       (--tokens 5,17,9 | --prompt TEXT) [--greedy 32]
//                       [--log error|warn|info|debug]   (llama.cpp's own log, on stderr; default error)
//
//   {"logits": [n_vocab floats]   raw next-token logits after the last prompt token
//    "probs":  [n_vocab floats]   llama.cpp's next-token probabilities (softmax of the logits)
//    "greedy": [ids]              the greedy continuation (argmax each step, fed back), if asked}
//
// With --prompt, the text is tokenized by the model's own tokenizer and the
// prompt and its continuation (--greedy tokens, default 64) are printed as text.
//
// Deterministic: one CPU thread, no sampling randomness (temperature 0 is argmax).
// DIR is where scripts/install-llama-runtime.sh installed node-llama-cpp (an ES
// module import resolves from this file's folder, not from DIR, hence the option).
import {createRequire} from "node:module";
import path from "node:path";
import {pathToFileURL} from "node:url";

function parseArgs(argv) {
  const args = {scale: 1, greedy: 0, runtime: ".", log: "error"};
  for (let i = 0; i < argv.length; i += 2) {
    const [key, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${key} needs a value`);
    switch (key) {
      case "--runtime": args.runtime = value; break;
      case "--model": args.model = value; break;
      case "--lora": args.lora = value; break;
      case "--scale": args.scale = Number(value); break;
      case "--tokens": args.tokens = value.split(",").map(Number); break;
      case "--prompt": args.prompt = value; break;
      case "--greedy": args.greedy = Number(value); break;
      case "--log": args.log = value; break;
      default: throw new Error(`unknown option ${key}`);
    }
  }
  const badTokens = args.tokens && (args.tokens.length === 0 || args.tokens.some(t => !Number.isInteger(t)));
  if (!args.model || !!args.tokens === (args.prompt !== undefined) || badTokens)
    throw new Error("usage: node llama-eval.mjs --runtime DIR --model M.gguf [--lora A.gguf --scale S] "
                    + "(--tokens 1,2,3 | --prompt TEXT) [--greedy N]");
  if (args.prompt !== undefined && args.greedy === 0) args.greedy = 64;
  return args;
}

// A Map<token, value> over the whole vocabulary as a dense array indexed by token id.
function dense(map, nVocab, what) {
  if (map.size !== nVocab) throw new Error(`${what}: ${map.size} entries, expected the whole vocabulary (${nVocab})`);
  const out = new Array(nVocab).fill(NaN);
  for (const [token, value] of map) out[token] = value;
  return out;
}

const args = parseArgs(process.argv.slice(2));
const entry = createRequire(path.resolve(args.runtime, "package.json")).resolve("node-llama-cpp");
const {getLlama} = await import(pathToFileURL(entry).href);
const llama = await getLlama({gpu: false, build: "never", progressLogs: false, logLevel: args.log});
const model = await llama.loadModel({modelPath: args.model, gpuLayers: 0});
const nVocab = model.fileInfo.metadata.tokenizer.ggml.tokens.length;
if (args.prompt !== undefined) {
  args.tokens = Array.from(model.tokenize(args.prompt));
  if (args.tokens.length === 0) throw new Error(`--prompt: no token of the model's vocabulary in "${args.prompt}"`);
}
// The KV cache in F32, not llama.cpp's default F16: rounding K and V to 11 bits
// moved the tiny model's probabilities by up to 1.5e-4 from a float64 reference
// (F32: a few 1e-7), which would hide a small real error. No flash attention: the plain path.
const contextOptions = {
  contextSize: args.tokens.length + args.greedy + 8, batchSize: 64, threads: 1, sequences: 1,
  flashAttention: false, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
};
if (args.lora) contextOptions.lora = {adapters: [{filePath: args.lora, scale: args.scale}]};
const context = await model.createContext(contextOptions);
const sequence = context.getSequence();

// The prompt: every token evaluated, the next-token distribution asked for after the last.
const input = args.tokens.map((t, i) => i + 1 < args.tokens.length ? t
    : [t, {generateNext: {logits: true, probabilities: true}}]);
const outputs = await sequence.controlledEvaluate(input);
const next = outputs[args.tokens.length - 1].next;
const result = {
  logits: dense(next.logits, nVocab, "logits"),
  probs: dense(next.probabilities, nVocab, "probabilities"),
};

if (args.greedy > 0) {
  // A fresh sequence state: the prompt again, then argmax tokens fed back one by one.
  await sequence.clearHistory();
  result.greedy = [];
  for await (const token of sequence.evaluate(args.tokens, {temperature: 0, yieldEogToken: true})) {
    result.greedy.push(token);
    if (result.greedy.length === args.greedy) break;
  }
}
if (args.prompt !== undefined) {
  console.log(model.detokenize(args.tokens) + model.detokenize(result.greedy));
} else {
  console.log(JSON.stringify(result));
}
await context.dispose();
await model.dispose();
await llama.dispose();
