// A C++ client of meshserve's public API (meshserve.v1.GenerationService), built from the stubs protoc
// generates from protos/ (see Makefile). It streams one generation to stdout; a refused call prints its
// gRPC status code and the google.rpc.BadRequest field violations from the status details.
//
//   build/meshserve_client [--target HOST:PORT] [--ca CA.pem] [--token JWT] [--chat] [--max-tokens N]
//                          [--temperature T] [--top-p P] [--seed S] [--timeout-s S] PROMPT
//
// Exit status: 0 when the stream completed, 1 when the call failed, 2 for bad arguments.

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>

#include <grpcpp/grpcpp.h>

#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "meshserve/v1/generation_service.grpc.pb.h"

namespace {

struct Options {
  std::string target = "localhost:8080";
  std::string ca_file;
  std::string token;
  std::string prompt;
  bool chat = false;
  int max_tokens = -1;
  float temperature = -1;
  bool has_temperature = false;
  float top_p = -1;
  long long seed = -1;
  double timeout_s = 0;
};

int Usage(const char* message) {
  std::cerr << "meshserve_client: " << message << "\n"
            << "usage: meshserve_client [--target HOST:PORT] [--ca CA.pem] [--token JWT] [--chat] [--max-tokens N]\n"
            << "                        [--temperature T] [--top-p P] [--seed S] [--timeout-s S] PROMPT\n";
  return 2;
}

bool ReadFile(const std::string& path, std::string* contents) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return false;
  std::stringstream buffer;
  buffer << file.rdbuf();
  *contents = buffer.str();
  return true;
}

const char* FinishReasonName(meshserve::v1::FinishReason reason) {
  switch (reason) {
    case meshserve::v1::FINISH_REASON_STOP: return "stop";
    case meshserve::v1::FINISH_REASON_LENGTH: return "length";
    default: return "unspecified";
  }
}

// The code's name as in google/rpc/code.proto (what every gRPC language prints).
const char* CodeName(grpc::StatusCode code) {
  static const char* const kNames[] = {
      "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
      "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
      "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int index = static_cast<int>(code);
  return index >= 0 && index <= 16 ? kNames[index] : "UNKNOWN";
}

// Prints the status and what its google.rpc details say: field violations, retry advice.
void PrintError(const grpc::Status& status) {
  std::cerr << "error: " << CodeName(status.error_code()) << " (" << status.error_code()
            << "): " << status.error_message() << "\n";
  google::rpc::Status details;
  if (status.error_details().empty() || !details.ParseFromString(status.error_details())) return;
  for (const google::protobuf::Any& detail : details.details()) {
    google::rpc::BadRequest bad_request;
    google::rpc::RetryInfo retry_info;
    if (detail.UnpackTo(&bad_request)) {
      for (const auto& violation : bad_request.field_violations()) {
        std::cerr << "field violation: " << violation.field() << ": " << violation.description() << "\n";
      }
    } else if (detail.UnpackTo(&retry_info)) {
      const auto& delay = retry_info.retry_delay();
      std::cerr << "retry after: " << delay.seconds() + delay.nanos() / 1e9 << " s\n";
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&](const char* name) -> const char* {
      if (i + 1 >= argc) {
        Usage((std::string(name) + " needs a value").c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--target") options.target = value("--target");
    else if (arg == "--ca") options.ca_file = value("--ca");
    else if (arg == "--token") options.token = value("--token");
    else if (arg == "--chat") options.chat = true;
    else if (arg == "--max-tokens") options.max_tokens = std::atoi(value("--max-tokens"));
    else if (arg == "--temperature") { options.temperature = std::strtof(value("--temperature"), nullptr); options.has_temperature = true; }
    else if (arg == "--top-p") options.top_p = std::strtof(value("--top-p"), nullptr);
    else if (arg == "--seed") options.seed = std::atoll(value("--seed"));
    else if (arg == "--timeout-s") options.timeout_s = std::atof(value("--timeout-s"));
    else if (arg.rfind("--", 0) == 0) return Usage(("unknown option " + arg).c_str());
    else if (options.prompt.empty()) options.prompt = arg;
    else return Usage("one prompt only");
  }
  if (options.prompt.empty()) return Usage("a prompt is needed");

  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (!options.ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!ReadFile(options.ca_file, &ssl.pem_root_certs)) return Usage(("cannot read " + options.ca_file).c_str());
    credentials = grpc::SslCredentials(ssl);
  }
  auto stub = meshserve::v1::GenerationService::NewStub(grpc::CreateChannel(options.target, credentials));

  meshserve::v1::GenerateRequest request;
  if (options.chat) {
    auto* message = request.mutable_chat()->add_messages();
    message->set_role("user");
    message->set_content(options.prompt);
  } else {
    request.set_prompt(options.prompt);
  }
  auto* sampling = request.mutable_sampling();
  if (options.max_tokens >= 0) sampling->set_max_tokens(options.max_tokens);
  if (options.has_temperature) sampling->set_temperature(options.temperature);
  if (options.top_p >= 0) sampling->set_top_p(options.top_p);
  if (options.seed >= 0) sampling->set_seed(static_cast<uint64_t>(options.seed));

  grpc::ClientContext context;
  if (!options.token.empty()) context.AddMetadata("authorization", "Bearer " + options.token);
  if (options.timeout_s > 0) {
    context.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(static_cast<long long>(options.timeout_s * 1000)));
  }

  auto reader = stub->Generate(&context, request);
  meshserve::v1::GenerateResponse response;
  int chunks = 0;
  while (reader->Read(&response)) {
    if (response.has_chunk()) {
      ++chunks;
      std::cout << response.chunk().text() << std::flush;  // as it arrives
    } else if (response.has_complete()) {
      const auto& complete = response.complete();
      std::cout << "\n";
      std::cerr << "[" << FinishReasonName(complete.finish_reason()) << ": " << complete.prompt_tokens()
                << " prompt + " << complete.completion_tokens() << " completion tokens in " << chunks
                << " chunks; request " << complete.request_id() << "]\n";
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) {
    PrintError(status);
    return 1;
  }
  return 0;
}
