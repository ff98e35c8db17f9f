#!/usr/bin/env node
// Run a consumer fixture through onnxruntime-node and print one JSON report on stdout.
//
//   node consumers/node-check.mjs --model FILE.onnx --fixture fixture.json [--threads 1]
//   node consumers/node-check.mjs --model encode-support.onnx --predict predict-query.onnx --fixture ...
//
// With --predict, --model is the support-cache pair's encoder and every case runs encode -> predict.
// Report: {"runtime": "onnxruntime-node", "version", "backend": "cpu", "node", "cases": [...]}
// (cases as lib/fixture.mjs `runFixture` records them), or {"error": "..."} when the model could not
// be loaded. Exit code 0 when every case ran (the caller judges the numbers), 1 when the model or
// the fixture could not be used, 2 on bad arguments. mitra_model/consumers/checks.py
// `check_in_node` runs it.

import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';

import * as ort from 'onnxruntime-node';

import { checkFixture, fullModel, runFixture, supportCachePair } from './lib/fixture.mjs';

function report(doc, code) {
  process.stdout.write(`${JSON.stringify(doc)}\n`);
  process.exitCode = code;
}

let args;
try {
  ({ values: args } = parseArgs({
    options: {
      model: { type: 'string' }, predict: { type: 'string' }, fixture: { type: 'string' }, threads: { type: 'string', default: '1' },
    },
    strict: true,
  }));
  if (!args.model || !args.fixture) throw new Error('--model and --fixture are required');
} catch (error) {
  process.stderr.write(`usage: node node-check.mjs --model FILE.onnx [--predict FILE.onnx] --fixture fixture.json [--threads N]\n${error.message}\n`);
  process.exit(2);
}

async function load(file) {
  try {
    return await ort.InferenceSession.create(file, {
      executionProviders: ['cpu'],
      intraOpNumThreads: Number(args.threads),
      interOpNumThreads: 1,
      graphOptimizationLevel: 'all',
      logSeverityLevel: 3,
    });
  } catch (error) {
    throw new Error(`onnxruntime-node ${ort.env.versions.node} could not load ${file}: ${error.message}`);
  }
}

const base = { runtime: 'onnxruntime-node', version: ort.env.versions.node, backend: 'cpu', node: process.version };
try {
  const fixture = checkFixture(JSON.parse(await readFile(args.fixture, 'utf8')));
  const sessions = [];
  try {
    for (const file of [args.model, args.predict].filter(Boolean)) sessions.push(await load(file));
    const predict = sessions.length === 2 ? supportCachePair(...sessions) : fullModel(sessions[0]);
    report({ ...base, cases: await runFixture(ort, predict, fixture) }, 0);
  } finally {
    for (const session of sessions) await session.release();
  }
} catch (error) {
  report({ ...base, error: error.message }, 1);
}
