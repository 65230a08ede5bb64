//! The `cifar-df` command; all the work is in the library (`cifar_df::cli`).

use std::process::ExitCode;

fn main() -> ExitCode {
    match cifar_df::cli::main() {
        Ok(code) => code,
        Err(err) => {
            // A closed stdout (`cifar-df query ... | head`) is not an error worth a message.
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", cifar_df::cli::error_message(&err));
            ExitCode::FAILURE
        }
    }
}
