#!/usr/bin/env node
// Streams one generation from meshserve's public endpoint (Envoy) with @grpc/grpc-js, loading the
// contract from protos/ at run time with @grpc/proto-loader (no generated code).
//
//   node client.js [--target HOST:PORT] [--ca ca.pem] [--token JWT] [--max-tokens N]
//                  [--temperature T] [--seed S] [--json] PROMPT
//
// Text goes to stdout as it arrives; --json prints every GenerateResponse as one JSON line instead.
// The token may also come from MESHSERVE_TOKEN. A failed call prints `error: CODE_NAME: message` to
// stderr and exits with the gRPC status code.
'use strict';

const path = require('node:path');
const fs = require('node:fs');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTOS = path.resolve(__dirname, '..', '..', 'protos');

function loadService(protosDir) {
  const definition = protoLoader.loadSync('meshserve/v1/generation_service.proto', {
    includeDirs: [protosDir],
    keepCase: true, // field names as in the .proto (max_tokens), as every other client sees them
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true, // adds `response: 'chunk' | 'complete'`
  });
  return grpc.loadPackageDefinition(definition).meshserve.v1.GenerationService;
}

function main(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: 'string', default: 'localhost:8080' },
      ca: { type: 'string' },
      token: { type: 'string' },
      'max-tokens': { type: 'string' },
      temperature: { type: 'string' },
      seed: { type: 'string' },
      'timeout-s': { type: 'string', default: '120' },
      protos: { type: 'string', default: DEFAULT_PROTOS },
      json: { type: 'boolean', default: false },
    },
  });
  if (positionals.length !== 1) {
    process.stderr.write('usage: node client.js [--target HOST:PORT] [--ca ca.pem] [--token JWT] [--json] PROMPT\n');
    return Promise.resolve(2);
  }
  const GenerationService = loadService(values.protos);
  const credentials = values.ca
    ? grpc.credentials.createSsl(fs.readFileSync(values.ca))
    : grpc.credentials.createInsecure();
  const client = new GenerationService(values.target, credentials);

  const sampling = {};
  if (values['max-tokens'] !== undefined) sampling.max_tokens = Number(values['max-tokens']);
  if (values.temperature !== undefined) sampling.temperature = Number(values.temperature);
  if (values.seed !== undefined) sampling.seed = values.seed;
  const metadata = new grpc.Metadata();
  const token = values.token || process.env.MESHSERVE_TOKEN;
  if (token) metadata.set('authorization', `Bearer ${token}`);
  const deadline = new Date(Date.now() + Number(values['timeout-s']) * 1000);

  return new Promise((resolve) => {
    const call = client.generate({ prompt: positionals[0], sampling }, metadata, { deadline });
    call.on('data', (response) => {
      if (values.json) {
        process.stdout.write(`${JSON.stringify(response)}\n`);
      } else if (response.response === 'chunk') {
        process.stdout.write(response.chunk.text);
      } else {
        const c = response.complete;
        process.stdout.write('\n');
        process.stderr.write(
          `[${c.finish_reason}; ${c.prompt_tokens} prompt + ${c.completion_tokens} completion tokens; ` +
            `request ${c.request_id}]\n`,
        );
      }
    });
    call.on('error', (error) => {
      const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code) || String(error.code);
      process.stderr.write(`error: ${name}: ${error.details}\n`);
      client.close();
      resolve(error.code || 1);
    });
    call.on('end', () => {
      client.close();
      resolve(0);
    });
  });
}

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => {
    process.exitCode = code;
  });
}

module.exports = { loadService, main };
